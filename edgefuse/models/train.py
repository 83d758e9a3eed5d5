"""Training zoo members: Adam with a one-cycle schedule, each member's checkpoint written as it finishes."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base.files import commit
from .architectures import build


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                batch_size: int = 128, lr: float = 1e-3, progress: tuple | None = None) -> nn.Module:
    """Adam with a cosine schedule; the seed fixes both the data order (init is seeded by the caller). Images train
    in channels-last memory, which runs the zoo CNN's training step about a quarter faster on the CPU (oneDNN's
    convolutions without layout reorders); the weights come back in torch's default layout."""
    gen = torch.Generator().manual_seed(seed)
    if x.dim() == 4:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
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
    return model.to(memory_format=torch.contiguous_format).eval()


@dataclass(frozen=True)
class Member:
    """One zoo member to train: its architecture, seed and checkpoint."""
    arch: str
    width: int
    epochs: int
    seed: int
    path: str


def train_member(job: Member, x: torch.Tensor, y: torch.Tensor, progress) -> dict[str, torch.Tensor]:
    """Train one member on (x, y), its shard, with a task on the rich `progress`; write its checkpoint
    (safetensors, the host's file modes) and return its weights."""
    from safetensors.torch import save_file

    torch.manual_seed(job.seed)
    model = build(job.arch, width=job.width)
    task = progress.add_task(f"training {job.arch} seed {job.seed}", total=job.epochs * ((len(x) + 127) // 128))
    train_model(model, x, y, job.epochs, seed=job.seed, progress=(progress, task))
    fd, tmp = tempfile.mkstemp(dir=Path(job.path).parent, suffix=".tmp")
    os.close(fd)
    save_file(model.state_dict(), tmp, metadata={"arch": job.arch, "width": str(job.width)})
    commit(Path(tmp), Path(job.path))  # the host's file modes (mkstemp's are private)
    return model.state_dict()
