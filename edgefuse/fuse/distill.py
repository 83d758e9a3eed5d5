"""Distillation as a training phase: a student (a fused model or one member) is trained towards the ensemble's
outputs on unlabeled inputs streamed from the whole training split, images shifted and flipped so that thousands of
steps do not memorise a few thousand images. Fixed seeds make two runs give the same student."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..base.errors import EdgefuseError
from ..targets import DISTILL_BATCH_SIZE, DISTILL_STEPS


@dataclass(frozen=True)
class DistillConfig:
    """One budget for every distilled candidate, so their accuracies compare."""
    steps: int = DISTILL_STEPS
    batch_size: int = DISTILL_BATCH_SIZE
    lr: float = 1e-3
    temperature: float = 2.0
    augment: bool = True
    seed: int = 0
    per_head: bool = False
    bn_train: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise EdgefuseError(f"distillation needs at least 1 step of at least 1 input, got {self.steps} steps "
                                f"of {self.batch_size}")

    def describe(self) -> str:
        aug = "shift/flip augmentation" if self.augment else "no augmentation"
        extra = "".join([", each head also towards its own member" if self.per_head else "",
                         ", BatchNorm statistics updated" if self.bn_train else ""])
        return (f"{self.steps} steps × {self.batch_size} inputs, KL at T = {self.temperature:g}, lr {self.lr:g}, {aug}"
                f"{extra}, seed {self.seed}")


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


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature t, scaled by t² so the gradient's size does not depend on t; over the last
    axis, averaged over everything else."""
    log_p = torch.log_softmax(student / t, -1).reshape(-1, student.shape[-1])
    target = torch.log_softmax(teacher / t, -1).reshape(-1, teacher.shape[-1])
    return nn.functional.kl_div(log_p, target, log_target=True, reduction="batchmean") * t * t


def _loss(student_out, teacher_out, t: float, per_head: bool) -> torch.Tensor:
    """The combined output towards the teacher's; with `per_head` and heads on both sides (as in Hydra), each head
    also towards its own member, so the heads stay as diverse as the members."""
    student, teacher = ([o] if isinstance(o, torch.Tensor) else list(o) for o in (student_out, teacher_out))
    loss = _kl(student[0], teacher[0], t)
    if per_head and len(student) > 1 and len(teacher) > 1:
        loss = loss + _kl(student[1], teacher[1], t)
    return loss


def distill(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, config: DistillConfig = DistillConfig(),
            label: str = "student", quiet: bool | None = None, targets: list | None = None) -> nn.Module:
    """Train `student` in place towards `teacher` (KL divergence at the temperature, scaled by T²) on random
    batches of `inputs`, with a cosine learning-rate schedule. BatchNorm statistics stay frozen (eval mode) unless
    `config.bn_train`: they were just reset on calibration data. With `config.per_head` and a teacher and student
    that both output head logits, each head also learns its own member. Only the student's tensors change; a
    non-finite loss stops with an error instead of returning a broken model. `targets`: the teacher's output for
    each step's batch, shared by the students of one run (the batches depend only on the inputs and the config):
    taken from it where an earlier student filled it in, appended to it where not, so the teacher runs once."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if len(inputs) == 0:
        raise EdgefuseError("distillation needs unlabeled inputs, none were given")
    gen = torch.Generator().manual_seed(config.seed)
    teacher.eval()
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    student.train(config.bn_train)
    t = config.temperature
    quiet = not sys.stderr.isatty() if quiet is None else quiet
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=quiet, transient=True) as progress:
        task = progress.add_task(f"distilling {label}", total=config.steps)
        for step in range(config.steps):
            idx = torch.randint(0, len(inputs), (min(config.batch_size, len(inputs)),), generator=gen)
            x = shift_flip(inputs[idx], gen) if config.augment else inputs[idx]
            if targets is not None and step < len(targets):
                target = targets[step]
            else:
                with torch.no_grad():
                    target = teacher(x)
                if targets is not None:
                    targets.append(target)
            loss = _loss(student(x), target, t, config.per_head)
            if not torch.isfinite(loss):
                raise EdgefuseError(f"distilling {label}: the loss is not finite (non-finite inputs or weights?)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress.advance(task)
    return student.eval()
