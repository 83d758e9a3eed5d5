"""Repair after merging: averaged units have shrunken activation statistics, so BatchNorm must be re-estimated."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..data import require_batches
from ..errors import EdgefuseError

REPAIRS = ("bn", None)


def reset_bn(model: nn.Module, data: Iterable) -> nn.Module:
    """Recompute every BatchNorm's running statistics on calibration inputs (cumulative average, eval elsewhere)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    xs = require_batches(data, "BatchNorm repair")
    saved = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for x in xs:
            model(x)
    for bn, m in zip(bns, saved):
        bn.momentum = m
        bn.eval()
    return model


def repair(model: nn.Module, method: str | None, data: Iterable | None) -> nn.Module:
    if method not in REPAIRS:
        raise EdgefuseError(f"unknown repair '{method}' (choose from {', '.join(str(r) for r in REPAIRS)})")
    return reset_bn(model, data) if method == "bn" else model
