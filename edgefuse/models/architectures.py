"""The zoo's architectures, by name: a plain MLP, a VGG-style CNN, ResNet-20 and ResNet-18, a small MobileNetV2 and
a small ViT, each taking raw [0, 1] images (normalisation inside)."""
from __future__ import annotations

import torch
from torch import nn

from ..base.errors import EdgefuseError
from .normalize import Normalize
from .vit import vit


def mlp(width: int = 256, depth: int = 3, in_features: int = 784, classes: int = 10) -> nn.Sequential:
    """Plain MLP: the architecture weight matching was first shown on."""
    layers: list[nn.Module] = [Normalize(), nn.Flatten()]
    prev = in_features
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, classes))
    return nn.Sequential(*layers)


def cnn(width: int = 16, classes: int = 10, image: int = 28) -> nn.Sequential:
    """VGG-style CNN with BatchNorm: four 3x3 convs, two max-pools, flatten into a small classifier."""
    w = width

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    side = image // 4
    return nn.Sequential(
        Normalize(),
        *block(1, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * w * side * side, 4 * w), nn.ReLU(), nn.Linear(4 * w, classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut where the shape changes (both sides of the add share units)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(width: int = 16, classes: int = 10) -> nn.Sequential:
    """ResNet-20 (3 stages of 3 basic blocks, widths w, 2w, 4w) for 28x28 grey images."""
    layers: list[nn.Module] = [Normalize(), nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            layers.append(BasicBlock(cin, cout, 2 if stage and not block else 1))
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def resnet18(width: int = 64, classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """torchvision-sized ResNet-18 (4 stages of 2 basic blocks, widths w..8w, 11 M parameters at w=64): the size of
    net users bring, for alignment timing at scale."""
    layers: list[nn.Module] = [Normalize(), nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    cin = width
    for stage in range(4):
        cout = width << stage
        for block in range(2):
            layers.append(BasicBlock(cin, cout, 2 if stage and not block else 1))
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class SqueezeExcite(nn.Module):
    """Channel gate: its output multiplies the block's channels, so the gate's last conv shares their units."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(channels // 4, 4), 1)
        self.expand = nn.Conv2d(max(channels // 4, 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.expand(gate))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, optional squeeze-excite, 1x1 project, residual when shapes
    match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool) -> None:
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            SqueezeExcite(hidden) if se else nn.Identity(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def mobilenetv2(width: int = 16, classes: int = 10, expand: int = 4) -> nn.Sequential:
    """A small MobileNetV2 for 28x28 images: depthwise convs, inverted residuals, squeeze-excite in later blocks."""
    w = width
    config = [(w, 1, False), (w, 1, False), (2 * w, 2, True), (2 * w, 1, True), (4 * w, 2, True), (4 * w, 1, True)]
    layers: list[nn.Module] = [Normalize(), nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6()]
    cin = w
    for cout, stride, se in config:
        layers.append(InvertedResidual(cin, cout, stride, expand, se))
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, 8 * w, 1, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes))


ARCHITECTURES = {"mlp": mlp, "cnn": cnn, "resnet20": resnet20, "mobilenetv2": mobilenetv2, "resnet18": resnet18,
                 "vit": vit}


def build(arch: str, **kwargs) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise EdgefuseError(f"unknown zoo architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](**kwargs)
