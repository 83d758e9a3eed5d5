"""Repair after merging. Averaged units have shrunken activation statistics (variance collapse), so a merged model
must be corrected before it is useful: re-estimate BatchNorm ("bn"), rescale merged units to the statistics of their
parents (REPAIR, for nets without BN: "repair"), or distil the fused model towards the ensemble ("distill")."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..models.data import require_batches

REPAIRS = ("bn", "repair", "lsq", "distill", None)


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


def _channel_stats(model: nn.Module, layer: nn.Module, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per output channel of `layer` (over batch and space) on the inputs."""
    total, sq, count = 0.0, 0.0, 0

    def hook(_m, _i, out: torch.Tensor) -> None:
        nonlocal total, sq, count
        flat = out.transpose(0, 1).reshape(out.shape[1], -1).double()
        total, sq, count = total + flat.sum(1), sq + (flat ** 2).sum(1), count + flat.shape[1]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in xs:
                model(x)
    finally:
        handle.remove()
    mean = total / count
    return mean, (sq / count - mean ** 2).clamp_min(0).sqrt()


def rescale_units(fused: nn.Module, parents: list[nn.Module], layers: list[tuple[nn.Module, nn.Module, str, torch.Tensor]],
                  data: Iterable) -> nn.Module:
    """REPAIR: layer by layer, give each merged unit the mean and standard deviation that the parents' units
    have on average. `layers` holds (module whose output holds the merged units first, the Linear/Conv to rescale,
    the parents' layer name, the parents' unit indices)."""
    xs = require_batches(data, "REPAIR", parents[0])
    for out_module, layer, name, units in layers:
        stats = [_channel_stats(p, p.get_submodule(name), xs) for p in parents]
        target_mean = torch.stack([s[0][units] for s in stats]).mean(0)
        target_std = torch.stack([s[1][units] for s in stats]).mean(0)
        mean, std = _channel_stats(fused, out_module, xs)
        mean, std = mean[:len(units)], std[:len(units)]
        scale = (target_std / std.clamp_min(1e-8)).float()
        with torch.no_grad():
            layer.weight.mul_(scale.view(-1, *[1] * (layer.weight.ndim - 1)))
            bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
            new_bias = (bias - mean.float()) * scale + target_mean.float()
            layer.bias = nn.Parameter(new_bias)
    return fused
