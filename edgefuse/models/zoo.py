"""The embedded default: N small Fashion-MNIST models from different seeds, trained once and cached as safetensors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .data import VALIDATION_IMAGES
from .normalize import Normalize
from .vit import vit
from .partition import Partition
from ..base.errors import EdgefuseError, first_line, warn_once
from ..base.files import commit



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
DEFAULT_ARCH = "cnn"  # the embedded zoo of `make export`
DEFAULT_EPOCHS = {"mlp": 4, "cnn": 2, "resnet20": 2, "mobilenetv2": 2, "resnet18": 2, "vit": 3}
DEFAULT_WIDTH = {"mlp": 256, "cnn": 16, "resnet20": 16, "mobilenetv2": 16, "resnet18": 64, "vit": 64}


def build(arch: str, **kwargs) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise EdgefuseError(f"unknown zoo architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](**kwargs)


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                batch_size: int = 128, lr: float = 1e-3, progress: tuple | None = None) -> nn.Module:
    """Adam with a cosine schedule; the seed fixes both the data order (init is seeded by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:  # (a rich Progress, its task)
                progress[0].advance(progress[1])
    return model.eval()


def cache_dir(root: Path, arch: str, width: int, epochs: int, partition: Partition = Partition(),
              n: int = 0) -> Path:
    """One folder per configuration; "-val5000" marks members that never saw the validation images; a partition's
    tag and N mark members trained on disjoint shards (shard i of N differs for another N); "-zs<seed>" another
    zoo seed."""
    shards = f"{partition.tag}-n{n}" if partition.kind != "all" else ""
    zoo_seed = f"-zs{partition.seed}" if partition.seed else ""
    return Path(root) / f"{arch}-w{width}-e{epochs}-val{VALIDATION_IMAGES}{shards}{zoo_seed}"


def zoo_models(arch: str = DEFAULT_ARCH, n: int = 4, width: int | None = None, epochs: int | None = None,
               cache: Path | str = "build/cache", quiet: bool = False, train: bool = True,
               partition: Partition = Partition()) -> tuple[list[nn.Module], list[Path]]:
    """Train (or load from the cache) N models of one zoo architecture on Fashion-MNIST's training part (the
    validation images held out), seeds s·N .. s·N+N−1 for the partition's seed s, each on all of it or on its
    shard of `partition`.
    `train=False` only reads the cache (machines that must never retrain) and names what is missing."""
    from safetensors.torch import save_file
    from rich.progress import Progress

    from .data import load_dataset

    if arch not in ARCHITECTURES:
        raise EdgefuseError(f"unknown zoo architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    width = width or DEFAULT_WIDTH[arch]
    epochs = epochs or DEFAULT_EPOCHS[arch]
    folder = cache_dir(Path(cache), arch, width, epochs, partition, n)
    seeds = [partition.seed * n + i for i in range(n)]
    paths = [folder / f"seed{s}.safetensors" for s in seeds]
    states = [cached_weights(p) for p in paths]
    missing = [s for s, state in enumerate(states) if state is None]
    if missing and not train:
        raise EdgefuseError(f"trained weights missing: {', '.join(str(paths[s]) for s in missing)} (run 'make export' "
                            f"where training is possible, then copy {cache} here)")
    if missing:
        splits = load_dataset("fashion-mnist")
        shards = partition.shards(splits.y_train, n)
        folder.mkdir(parents=True, exist_ok=True)
        with Progress(disable=quiet) as progress:
            for s in missing:
                x, y = splits.x_train[shards[s]], splits.y_train[shards[s]]
                torch.manual_seed(seeds[s])
                model = build(arch, width=width)
                task = progress.add_task(f"training {arch} seed {seeds[s]}", total=epochs * ((len(x) + 127) // 128))
                train_model(model, x, y, epochs, seed=seeds[s], progress=(progress, task))
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
                os.close(fd)
                save_file(model.state_dict(), tmp, metadata={"arch": arch, "width": str(width)})
                commit(Path(tmp), paths[s])  # the host's file modes (mkstemp's are private)
                states[s] = model.state_dict()
        (folder / "zoo.json").write_text(json.dumps({"arch": arch, "width": width, "epochs": epochs,
                                                     "partition": partition.describe(), "members": n,
                                                     "seeds": seeds}))
    models = []
    for state in states:
        model = build(arch, width=width)
        model.load_state_dict(state)
        models.append(model.eval())
    return models, paths


def cached_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """A cached model's weights, read once; None when there are none or they do not load (truncated by a full disk,
    edited), which is said once: those are trained again, never trusted."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a cut or corrupt file
        warn_once(f"cached weights {path} do not load ({first_line(e)}): trained again")
        return None
