"""The fine-tune zoo: one network pretrained once, then fine-tuned N times — how most users get their N models. The
base trains on one half of Fashion-MNIST's training part; each member starts from it and fine-tunes on the other
half (all of it, or its shard of the partition) with its own seed and learning rate. Cached like the zoo."""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..base.files import commit
from .partition import Partition
from .zoo import DEFAULT_ARCH, DEFAULT_EPOCHS, DEFAULT_WIDTH, cached_weights, build, cache_dir, train_model

FINETUNE_LR = (1e-3, 5e-4, 2e-3, 7e-4)  # member i's peak learning rate: FINETUNE_LR[i % 4]
FINETUNE_EPOCHS = 2
SPLIT_SEED = 1234  # which half of the training part pretrains the base


def finetune_zoo(arch: str = DEFAULT_ARCH, n: int = 4, cache: Path | str = "build/cache", quiet: bool = False,
                 partition: Partition = Partition()) -> tuple[list[nn.Module], nn.Module, list[Path]]:
    """(members, base, the members' files): trained once, then read from the cache."""
    from rich.progress import Progress
    from safetensors.torch import save_file

    from .data import load_dataset

    width, epochs = DEFAULT_WIDTH[arch], DEFAULT_EPOCHS[arch]
    recipe = f"e{FINETUNE_EPOCHS}-lr{'-'.join(f'{lr:g}' for lr in FINETUNE_LR)}-s{SPLIT_SEED}"
    folder = Path(f"{cache_dir(Path(cache), arch, width, epochs, partition, n)}-finetune-{recipe}")
    seeds = [partition.seed * n + i for i in range(n)]
    base_path, paths = folder / "base.safetensors", [folder / f"seed{s}.safetensors" for s in seeds]
    base_state, states = cached_weights(base_path), [cached_weights(p) for p in paths]
    if base_state is None or None in states:
        splits = load_dataset("fashion-mnist")
        half = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(SPLIT_SEED))
        pre, pool = half[: len(half) // 2], half[len(half) // 2:]
        shards = partition.shards(splits.y_train[pool], n)
        folder.mkdir(parents=True, exist_ok=True)

        def save(model: nn.Module, path: Path) -> dict:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            save_file(model.state_dict(), tmp, metadata={"arch": arch, "width": str(width)})
            commit(Path(tmp), path)  # the host's file modes (mkstemp's are private)
            return model.state_dict()

        with Progress(disable=quiet) as progress:
            if base_state is None:
                torch.manual_seed(1000 + partition.seed)
                model = build(arch, width=width)
                task = progress.add_task(f"pretraining the {arch} base", total=epochs * ((len(pre) + 127) // 128))
                train_model(model, splits.x_train[pre], splits.y_train[pre], epochs, seed=1000 + partition.seed,
                            progress=(progress, task))
                base_state, states = save(model, base_path), [None] * n  # new base: new fine-tunes
            for i, s in enumerate(seeds):
                if states[i] is not None:
                    continue
                idx = pool[shards[i]]
                model = build(arch, width=width)
                model.load_state_dict(base_state)
                task = progress.add_task(f"fine-tuning {arch} seed {s}",
                                         total=FINETUNE_EPOCHS * ((len(idx) + 127) // 128))
                train_model(model, splits.x_train[idx], splits.y_train[idx], FINETUNE_EPOCHS, seed=s,
                            lr=FINETUNE_LR[i % len(FINETUNE_LR)], progress=(progress, task))
                states[i] = save(model, paths[i])
        (folder / "zoo.json").write_text(json.dumps({
            "arch": arch, "width": width, "base_epochs": epochs, "finetune_epochs": FINETUNE_EPOCHS,
            "partition": partition.describe(), "members": n, "seeds": seeds,
            "learning_rates": [FINETUNE_LR[i % len(FINETUNE_LR)] for i in range(n)]}))
    base = build(arch, width=width)
    base.load_state_dict(base_state)
    models = []
    for state in states:
        model = copy.deepcopy(base)
        model.load_state_dict(state)
        models.append(model.eval())
    return models, base.eval(), paths
