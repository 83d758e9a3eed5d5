"""The embedded default: N small Fashion-MNIST models from different seeds, trained once and cached as safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .architectures import (ARCHITECTURES, BasicBlock, InvertedResidual, SqueezeExcite, build, cnn, mlp,  # noqa: F401
                            mobilenetv2, resnet18, resnet20, vit)
from .data import VALIDATION_IMAGES
from .normalize import Normalize  # noqa: F401  (zoo.Normalize: the zoo's first layer)
from .partition import Partition
from .train import Member, train_member, train_model  # noqa: F401
from ..base.errors import EdgefuseError, first_line, warn_once


DEFAULT_ARCH = "cnn"  # the embedded zoo of `make export`
DEFAULT_EPOCHS = {"mlp": 4, "cnn": 2, "resnet20": 2, "mobilenetv2": 2, "resnet18": 2, "vit": 3}
DEFAULT_WIDTH = {"mlp": 256, "cnn": 16, "resnet20": 16, "mobilenetv2": 16, "resnet18": 64, "vit": 64}


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
        folder.mkdir(parents=True, exist_ok=True)
        splits = load_dataset("fashion-mnist")
        shards = partition.shards(splits.y_train, n)
        with Progress(disable=quiet) as progress:
            for s in missing:
                states[s] = train_member(Member(arch, width, epochs, seeds[s], str(paths[s])),
                                         splits.x_train[shards[s]], splits.y_train[shards[s]], progress)
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
