"""A model's BatchNorm layers and the re-estimation of their statistics on calibration inputs: what the repairs of
a merged model, the loss barrier between two models and the merges of fine-tunes all need, so it sits below them."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .data import require_batches


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of `model`: what repair "bn" resets (none: it has nothing to repair)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def reset_bn(model: nn.Module, data: Iterable) -> nn.Module:
    """Recompute every BatchNorm's running statistics on calibration inputs (cumulative average, eval elsewhere)."""
    bns = batchnorms(model)
    if not bns:
        return model
    xs = require_batches(data, "BatchNorm repair", model)
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
