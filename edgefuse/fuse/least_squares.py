"""Repair "lsq", registered: each merged layer re-solved by least squares towards the members' mean output (and,
under alpha, each member's isolated units towards that member), then at a depth split each head's first layer
towards its own member, after an adapter where a shortcut also reads the trunk (fuse/lsq.py, fuse/adapter.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..models.data import require_batches
from ..spec.permspec import PermSpec
from .adapter import adapt_heads
from .lsq import Fit, following_bn, lsq_repair
from .lsq_isolated import isolated_fits
from .model import FusedModel
from .neuron import MixedLayer
from .repair import RepairJob, merged_layers, register
from .select import tensor_layout


@register("lsq", "re-solve each merged layer by least squares towards the members' mean output, and each head's "
          "first layer towards its member")
def _lsq(job: RepairJob) -> None:
    xs = require_batches(job.data, "lsq repair", job.aligned[0])
    bns = following_bn(job.aligned[0], list(job.spec.weight_layers))
    lsq_repair(job.fused, job.aligned, _merged_fits(job.fused, job.aligned, job.spec, job.layouts, bns), xs)
    if job.layouts is None:
        adapt_heads(job.fused, job.aligned, xs)
        lsq_repair(job.fused, job.aligned, _head_fits(job.fused, job.spec, bns), xs)


def _merged_fits(fused: FusedModel, aligned: list[nn.Module], spec: PermSpec, layouts: dict | None,
                 bns: dict[str, str]) -> list[Fit]:
    """The merged layers (towards the members' mean), each followed under alpha by every member's isolated units
    of that layer (towards that member)."""
    owner = fused.trunk if layouts is None else fused.heads[0]
    everyone = tuple(range(len(aligned)))
    merged = {name: (layer, units) for _, layer, name, units in merged_layers(fused, spec, layouts)}
    fits = []
    for name in spec.weight_layers:
        axes = spec.params.get(f"{name}.weight")
        outer = owner.get_submodule(name) if layouts is not None and axes and axes[0] is not None else None
        mixed = outer if isinstance(outer, MixedLayer) else None  # whose input its parts share
        if name in merged:
            fits.append(Fit(merged[name][0], everyone, name, merged[name][1], bns.get(name), owner, source=mixed))
        if mixed is not None:
            isolated = tensor_layout(axes[0], layouts, name).isolated
            fits += isolated_fits(mixed, len(aligned), name, isolated, bns.get(name), owner)
    return fits


def _head_fits(fused: FusedModel, spec: PermSpec, bns: dict[str, str]) -> list[Fit]:
    """At a depth split, each head's first layer (towards its own member), fed by its adapter where it has one."""
    trunk = {n for n, _ in fused.trunk.named_modules()}
    first = next(n for n in spec.weight_layers if n not in trunk)
    fits = []
    for i, head in enumerate(fused.heads):
        layer = head.get_submodule(first)
        fits.append(Fit(layer, (i,), first, torch.arange(layer.weight.shape[0]), bns.get(first), head))
    return fits
