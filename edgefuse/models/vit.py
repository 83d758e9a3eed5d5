"""A Vision Transformer sized for Fashion-MNIST on 2 cores: patch embedding (a strided conv), a class token, a
learned position embedding, pre-LayerNorm blocks with timm-style attention (one qkv Linear, heads by reshape,
scaled_dot_product_attention) and a GELU MLP, the class token's head. Every layer with weights is a Linear or the
patch conv, so the least-squares repair re-solves each of them."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .normalize import Normalize


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x)). The residual stream is all that flows between blocks,
    so a depth split may fall before either half."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, patch: int = 7,
                 image: int = 28, classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.embed = nn.Conv2d(1, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.normalize(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit(width: int = 64, classes: int = 10) -> ViT:
    """The zoo's ViT: 4 blocks of width `width`, 4 heads, MLP 2× wide, 7×7 patches (16 tokens and the class token)."""
    return ViT(width=width, classes=classes)
