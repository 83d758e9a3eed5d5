"""Small architectures on 8x8 digits for fast tests, and a few the spec must refuse."""
import torch
from torch import nn

from edgefuse.models import zoo


def digits_mlp() -> nn.Module:
    return zoo.mlp(width=32, depth=2, in_features=64)


def digits_cnn() -> nn.Module:
    return zoo.cnn(width=4, image=8)


class CatGrouped(nn.Module):
    """A grouped conv over two concatenated tensors: its blocks would straddle two groups, which is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))


class HiddenCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(64, 16)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


class InputCat(nn.Module):
    """Concatenates a hidden layer with the raw input: those channels can never be permuted together."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.head = nn.Linear(80, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.cat([torch.relu(self.a(x)), x], dim=1))


class TinyViTBlock(nn.Module):
    """Patch tokens made by a reshape of the input, then Linears over the tokens' last axis, pooled over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 12)
        self.mlp = nn.Linear(12, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 4, 16)
        h = self.embed(tokens)
        h = h + self.mlp(torch.relu(h))
        return self.head(h.mean(1))


class BlockGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.a(x))).mean((2, 3)))


class Residual(nn.Module):
    """Residual add over a hidden width: both sides must share one permutation."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 24)
        self.f = nn.Linear(24, 24)
        self.g = nn.Linear(24, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        h = h + self.g(torch.relu(self.f(h)))
        return self.head(h)


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth's contract (torchvision is not a dependency): drop whole rows of `x` with
    probability p in training, the identity otherwise. torch.fx keeps it as one call, as torchvision's is."""
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")


class StochasticDepthBlock(nn.Module):
    """EfficientNet-style MBConv: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project, stochastic depth on the
    residual branch, dropout before the classifier."""

    def __init__(self, width: int = 8, expand: int = 4, p: float = 0.2) -> None:
        super().__init__()
        hidden = width * expand
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(hidden, 4, 1), nn.Conv2d(4, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width))
        self.p = p
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, 10))

    def forward(self, x):
        h = self.stem(x)
        b = self.dw(self.expand(h))
        b = b * torch.sigmoid(self.se_expand(nn.functional.silu(self.se_reduce(b.mean((2, 3), keepdim=True)))))
        h = h + stochastic_depth(self.project(b), self.p, "row", self.training)
        return self.head(h.mean((2, 3)))


class RegNetBlock(nn.Module):
    """RegNet-Y-style bottleneck: 1x1, grouped 3x3 of group width 4, a second grouped 3x3 that widens each group
    (4 → 6 channels), squeeze-excite, 1x1 back, residual."""

    def __init__(self, width: int = 8, bottleneck: int = 16, groups: int = 4) -> None:
        super().__init__()
        wide = bottleneck * 3 // 2
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(width, bottleneck, 1, bias=False), nn.BatchNorm2d(bottleneck), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(bottleneck, bottleneck, 3, padding=1, groups=groups, bias=False),
                               nn.BatchNorm2d(bottleneck), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(bottleneck, wide, 3, padding=1, groups=groups), nn.BatchNorm2d(wide),
                                nn.ReLU())
        self.se_reduce, self.se_expand = nn.Conv2d(wide, 4, 1), nn.Conv2d(4, wide, 1)
        self.c = nn.Sequential(nn.Conv2d(wide, width, 1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.stem(x)
        b = self.b2(self.b(self.a(h)))
        b = b * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(b.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(h + self.c(b)).mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """As torchvision's ShuffleNet-V2 writes it."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    """ShuffleNet-V2's unit: stride 2 runs two branches on the whole input; stride 1 splits the channels in two,
    runs one half through the branch and passes the other on; both concatenate and shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half, self.stride = cout // 2, stride
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, 2, cin, relu=False), _conv_bn(cin, half))
        self.branch2 = nn.Sequential(_conv_bn(cin if stride == 2 else half, half),
                                     _conv_bn(half, half, 3, stride, half, relu=False), _conv_bn(half, half))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetBlock(nn.Module):
    """A ShuffleNet-V2 stage: a stride-2 unit and three stride-1 units, then a 1×1 conv and the classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn(1, 8, 3)
        self.stage = nn.Sequential(ShuffleUnit(8, width, 2), *[ShuffleUnit(width, width, 1) for _ in range(3)])
        self.conv5 = _conv_bn(width, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.conv5(self.stage(self.stem(x))).mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Trained-like BN statistics and affine parameters: defaults would hide a spec that forgets them."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


class Normed(nn.Module):
    """LayerNorm over features and GroupNorm in blocks of channels: both become GroupNorms when batched."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.gn(self.a(x))).mean((2, 3))
        return self.head(torch.relu(self.ln(self.fc(h))))


class HiddenSoftmax(nn.Module):
    """A softmax across hidden channels mixes them: no grouped-kernel form exists."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.softmax(self.a(x.flatten(1)), dim=1))


def member(factory, seed: int) -> nn.Module:
    """One ensemble member: its own random init and trained-like BN statistics, so exactness cannot be luck."""
    torch.manual_seed(seed)
    return randomize_bn(factory(), seed)
