"""The embedded default: N small Fashion-MNIST models from different seeds, trained once and cached as safetensors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import EdgefuseError

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class Normalize(nn.Module):
    """Normalisation inside the model, so the exported graph takes raw [0, 1] images on the device."""

    def __init__(self, mean: float = FASHION_MEAN, std: float = FASHION_STD) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


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


ARCHITECTURES = {"mlp": mlp, "cnn": cnn}
DEFAULT_EPOCHS = {"mlp": 4, "cnn": 2}


def build(arch: str, **kwargs) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise EdgefuseError(f"unknown zoo architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](**kwargs)


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                batch_size: int = 128, lr: float = 1e-3, progress=None, task=None) -> nn.Module:
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
            if progress is not None:
                progress.advance(task)
    return model.eval()


def cache_dir(root: Path, arch: str, width: int, epochs: int) -> Path:
    return Path(root) / f"{arch}-w{width}-e{epochs}"


def zoo_models(arch: str = "cnn", n: int = 4, width: int | None = None, epochs: int | None = None,
               cache: Path | str = "build/cache", quiet: bool = False) -> tuple[list[nn.Module], list[Path]]:
    """Train (or load from the cache) N models of one zoo architecture on Fashion-MNIST, seeds 0..N-1."""
    from safetensors.torch import load_file, save_file
    from rich.progress import Progress

    from .data import fashion_mnist

    width = width or {"mlp": 256, "cnn": 16}[arch]
    epochs = epochs or DEFAULT_EPOCHS[arch]
    folder = cache_dir(Path(cache), arch, width, epochs)
    paths = [folder / f"seed{s}.safetensors" for s in range(n)]
    missing = [s for s, p in enumerate(paths) if not p.is_file()]
    if missing:
        x, y = fashion_mnist("train")
        folder.mkdir(parents=True, exist_ok=True)
        steps = epochs * ((len(x) + 127) // 128)
        with Progress(disable=quiet) as progress:
            for s in missing:
                torch.manual_seed(s)
                model = build(arch, width=width)
                task = progress.add_task(f"training {arch} seed {s}", total=steps)
                train_model(model, x, y, epochs, seed=s, progress=progress, task=task)
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
                os.close(fd)
                save_file(model.state_dict(), tmp, metadata={"arch": arch, "width": str(width)})
                os.replace(tmp, paths[s])
        (folder / "zoo.json").write_text(json.dumps({"arch": arch, "width": width, "epochs": epochs}))
    models = []
    for p in paths:
        model = build(arch, width=width)
        model.load_state_dict(load_file(str(p)))
        models.append(model.eval())
    return models, paths
