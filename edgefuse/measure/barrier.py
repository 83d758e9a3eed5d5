"""The loss barrier along the straight line between two models: the measure of whether alignment worked."""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..base.errors import EdgefuseError
from ..models.batchnorm import reset_bn


def interpolate(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    """(1 - t)·a + t·b on every floating tensor, as a new module."""
    sa, sb = a.state_dict(), b.state_dict()
    mid = copy.deepcopy(a)
    mid.load_state_dict({k: (1 - t) * v + t * sb[k] if v.is_floating_point() else v for k, v in sa.items()})
    return mid.eval()


def _evaluate(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    loss = correct = count = 0.0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
            count += len(y)
    return loss / count, correct / count


def barrier(a: nn.Module, b: nn.Module, data: Iterable, steps: int = 11, calibration: Iterable | None = None) -> dict:
    """Loss and accuracy at `steps` evenly spaced points from a to b. `loss_barrier` is the largest rise of the
    loss above the straight line between the end points; `accuracy_barrier` the largest drop below it. With
    `calibration`, BatchNorm statistics of every interpolated model are re-estimated first (as in REPAIR), so the
    barrier measures the weights, not stale statistics."""
    batches = [item for item in data if isinstance(item, (tuple, list)) and len(item) == 2]
    if not batches:
        raise EdgefuseError("barrier needs labelled data: (inputs, labels) batches")
    if steps < 3:
        raise EdgefuseError(f"barrier needs at least 3 points, got steps={steps}")
    ts = [i / (steps - 1) for i in range(steps)]
    losses, accs = [], []
    for t in ts:
        model = interpolate(a, b, t)
        if calibration is not None and 0 < t < 1:
            reset_bn(model, calibration)
        loss, acc = _evaluate(model, batches)
        losses.append(loss)
        accs.append(acc)
    line = [(1 - t) * losses[0] + t * losses[-1] for t in ts]
    acc_line = [(1 - t) * accs[0] + t * accs[-1] for t in ts]
    return {"t": ts, "loss": losses, "accuracy": accs,
            "loss_barrier": max(l - m for l, m in zip(losses, line)),
            "accuracy_barrier": max(m - acc for acc, m in zip(accs, acc_line))}
