"""Distillation as a training phase: a student (a fused model or one member) is trained towards the ensemble's
outputs on unlabeled inputs streamed from the whole training split, images shifted and flipped so that thousands of
steps do not memorise a few thousand images. Fixed seeds make two runs give the same student."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EdgefuseError


@dataclass(frozen=True)
class DistillConfig:
    """One budget for every distilled candidate, so their accuracies compare."""
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 2.0
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise EdgefuseError(f"distillation needs at least 1 step of at least 1 input, got {self.steps} steps "
                                f"of {self.batch_size}")

    def describe(self) -> str:
        aug = "shift/flip augmentation" if self.augment else "no augmentation"
        return (f"{self.steps} steps × {self.batch_size} inputs, KL at T = {self.temperature:g}, {aug}, "
                f"seed {self.seed}")


def shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Each image shifted by up to `pad` pixels (zero fill) and flipped left-right with probability 1/2. Inputs
    that are not images (fewer than 4 dimensions) pass unchanged."""
    if x.ndim != 4:
        return x
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def distill(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, config: DistillConfig = DistillConfig(),
            label: str = "student", quiet: bool | None = None) -> nn.Module:
    """Train `student` in place towards `teacher` (KL divergence at the temperature, scaled by T²) on random
    batches of `inputs`, with a cosine learning-rate schedule. BatchNorm statistics stay frozen (eval mode): they
    were just reset on calibration data, and a few thousand steps of small batches would only add noise. Only the
    student's tensors change; a non-finite loss stops with an error instead of returning a broken model."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if len(inputs) == 0:
        raise EdgefuseError("distillation needs unlabeled inputs, none were given")
    gen = torch.Generator().manual_seed(config.seed)
    teacher.eval()
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    student.eval()
    t = config.temperature
    quiet = not sys.stderr.isatty() if quiet is None else quiet
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=quiet, transient=True) as progress:
        task = progress.add_task(f"distilling {label}", total=config.steps)
        for _ in range(config.steps):
            idx = torch.randint(0, len(inputs), (min(config.batch_size, len(inputs)),), generator=gen)
            x = shift_flip(inputs[idx], gen) if config.augment else inputs[idx]
            with torch.no_grad():
                target = torch.log_softmax(teacher(x) / t, -1)
            log_p = torch.log_softmax(student(x) / t, -1)
            loss = nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean") * t * t
            if not torch.isfinite(loss):
                raise EdgefuseError(f"distilling {label}: the loss is not finite (non-finite inputs or weights?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress.advance(task)
    return student.eval()
