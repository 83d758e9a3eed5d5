"""Transformer blocks written three ways (torchvision's is imported in the tests), and variants the spec must refuse."""
import sys
import types

import torch
from torch import nn
from torch.nn import functional as F


def torchvision_vit():
    """torchvision's VisionTransformer class, or None. PyPI's torchvision is built against another torch; its
    pure-Python models import once its C-operator registrations are replaced by an empty module."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except Exception:  # not installed, or built for an incompatible torch
        return None
    return VisionTransformer


class TimmAttention(nn.Module):
    """As timm writes it: one qkv Linear, a reshape to (B, T, 3, heads, width), a permute, SDPA."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads, self.width = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.width) if qk_norm else nn.Identity()

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.width).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, c))


class HandAttention(nn.Module):
    """Separate q, k, v Linears, softmax(q kᵀ / √d) v by hand; `rotary` multiplies q and k by a position table,
    `kv_heads` < heads shares k and v between heads (grouped-query): both are refused."""

    def __init__(self, dim: int, heads: int, rotary: bool = False, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.width = heads, kv_heads or heads, dim // heads
        kv = self.kv_heads * self.width
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv), nn.Linear(dim, kv)
        self.rotary = nn.Parameter(torch.randn(1, 1, 17, self.width)) if rotary else None

    def split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, heads, self.width).transpose(1, 2)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.split(self.q(x), self.heads), self.split(self.k(x), self.kv_heads), \
            self.split(self.v(x), self.kv_heads)
        if self.kv_heads != self.heads:
            k, v = (y.repeat_interleave(self.heads // self.kv_heads, dim=1) for y in (k, v))
        if self.rotary is not None:
            q = q * self.rotary
        scores = torch.softmax(q @ k.transpose(-2, -1) / self.width ** 0.5, dim=-1)
        return self.o((scores @ v).transpose(1, 2).reshape(b, t, c))


class TinyViT(nn.Module):
    """Patch embedding (a strided conv), class token, position embedding, pre-LN blocks, the class token's head."""

    def __init__(self, attention=TimmAttention, dim: int = 16, heads: int = 4, depth: int = 2, image: int = 8,
                 patch: int = 2, **options) -> None:
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.embed = nn.Conv2d(1, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(dim), "attn": attention(dim, heads, **options), "ln2": nn.LayerNorm(dim),
            "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))})
            for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["mlp"](b["ln2"](x))
        return self.head(self.norm(x)[:, 0])


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """LayerNorm affine terms away from (1, 0), so a mis-permuted norm shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    return model


class ConvNeXtBlock(nn.Module):
    """Channels-last inside a conv net: depthwise conv, permute to (B, H, W, C), LayerNorm and Linears, back."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 3, padding=1)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.down(F.gelu(self.up(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


def digits_vit() -> nn.Module:
    """The zoo's ViT at digits size: 8×8 images in 2×2 patches, width 16, 2 blocks of 2 heads."""
    from edgefuse.models.vit import ViT
    return ViT(width=16, depth=2, heads=2, patch=2, image=8)


class LayerScaleBlock(nn.Module):
    """A pre-LN MLP block whose branch is scaled per channel by a learned vector (timm's LayerScale: x * gamma)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(16, dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x.reshape(x.shape[0], 4, 16))
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x)))) * self.gamma
        return self.head(x.mean(1))


def torchvision_vits(n: int, layers: int = 2, heads: int = 4, width: int = 16) -> list[nn.Module]:
    """n small torchvision ViTs for 8×8 RGB images, seeds 0..n-1, with a non-zero head and class token (torchvision
    starts both at zero) and LayerNorm affines away from (1, 0)."""
    make, models = torchvision_vit(), []
    for seed in range(n):
        torch.manual_seed(seed)
        model = make(image_size=8, patch_size=2, num_layers=layers, num_heads=heads, hidden_dim=width,
                     mlp_dim=2 * width, num_classes=10)
        nn.init.normal_(model.heads.head.weight)
        nn.init.normal_(model.class_token)
        models.append(randomize_norms(model.eval(), seed))
    return models
