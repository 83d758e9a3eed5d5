"""Repair after merging, as registered methods. Averaged units have shrunken activation statistics (variance
collapse), so a merged model must be corrected before it is useful: re-estimate BatchNorm ("bn"), rescale merged
units to the statistics of their parents (REPAIR, for nets without BN: "repair"), re-solve merged layers by least
squares ("lsq", fuse/lsq_repair.py), or distil the fused model towards the ensemble ("distill"). A repair is one
function registered here with `register`, taking a `RepairJob`; `fuse()` runs whichever the caller names, and the
CLI's choices read `REPAIRS`."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..base.errors import warn_once
from ..models.batchnorm import batchnorms, reset_bn
from ..models.data import require_batches
from ..spec.permspec import PermSpec
from .distill import DistillConfig, distill
from .model import FusedModel, ensemble
from .neuron import MixedLayer
from .select import tensor_layout


@dataclass(frozen=True)
class RepairJob:
    """What a repair works on: the fused model (changed in place), the aligned members it came from, the spec, the
    alpha layouts (None for a depth split), the calibration batches and a distillation step count."""
    fused: FusedModel
    aligned: list[nn.Module]
    spec: PermSpec
    layouts: dict | None
    data: Iterable | None
    steps: int


@dataclass(frozen=True)
class Repair:
    name: str | None
    apply: Callable[[RepairJob], None]
    what: str
    in_grid: bool = True  # offered as a sweep's repair (distillation is the grid's own step, not a repair there)


REPAIRS: dict[str | None, Repair] = {}
DEFAULT_REPAIR = "lsq"  # the default repair everywhere (why: docs/results.md, "The least-squares repair")


def register(name: str | None, what: str, in_grid: bool = True) -> Callable:
    def deco(fn: Callable[[RepairJob], None]) -> Callable[[RepairJob], None]:
        REPAIRS[name] = Repair(name, fn, what, in_grid)
        return fn
    return deco


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


def merged_layers(fused: FusedModel, spec: PermSpec, layouts: dict | None) -> list:
    """(output module, layer to rescale, parents' layer name, parents' unit indices) of every merged hidden layer,
    in order: the trunk's layers for a depth split, the fused part of every MixedLayer for alpha."""
    out = []
    net = fused.trunk if layouts is None else fused.heads[0]
    for name in spec.weight_layers:
        axes = spec.params.get(f"{name}.weight")
        if not axes or axes[0] is None:
            continue  # the output layer: its units are the logits, never rescaled
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            continue  # not in the trunk: a head's layer, not merged
        if isinstance(layer, MixedLayer):
            if layer.fused is not None:
                out.append((layer, layer.fused, name, tensor_layout(axes[0], layouts, name).fused))
        elif isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and getattr(layer, "groups", 1) == 1:
            out.append((layer, layer, name, torch.arange(layer.weight.shape[0])))
    return out


@register(None, "none: the merged weights as they are")
def _none(job: RepairJob) -> None:
    return None


@register("bn", "reset every BatchNorm's statistics on the calibration images")
def _bn(job: RepairJob) -> None:
    if not batchnorms(job.fused):
        warn_once("repair 'bn' re-estimates BatchNorm statistics and this model has no BatchNorm: the fused model "
                  "is left unrepaired (repair 'lsq' or 'repair' works without BatchNorm)")
    reset_bn(job.fused, job.data)


@register("repair", "REPAIR: rescale merged units to their parents' mean statistics, then reset BatchNorm")
def _rescale(job: RepairJob) -> None:
    rescale_units(job.fused, job.aligned, merged_layers(job.fused, job.spec, job.layouts), job.data)
    reset_bn(job.fused, job.data)


@register("distill", "reset BatchNorm, then distil towards the ensemble on the calibration images", in_grid=False)
def _distill(job: RepairJob) -> None:
    reset_bn(job.fused, job.data)
    inputs = torch.cat(require_batches(job.data, "distillation", job.aligned[0]))
    distill(job.fused, ensemble(job.aligned), inputs, DistillConfig(steps=job.steps), label="the fused model")
