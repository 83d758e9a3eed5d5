"""Fusion of aligned models into one FusedModel (trunk + heads)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..base.validate import check_models, nonfinite_tensor
from ..base.errors import EdgefuseError, warn_once
from ..spec.permspec import PermSpec
from .batched import batch_models
from .model import FusedModel, ensemble
from .neuron import MixedLayer, fuse_alpha
from ..models.data import require_batches
from .distill import DistillConfig, distill
from .adapter import adapt_heads
from .lsq import Fit, following_bn, lsq_repair
from .lsq_isolated import isolated_fits
from .repair import REPAIRS, batchnorms, reset_bn, rescale_units
from .select import check_select, tensor_layout
from .split import fuse_depth


@dataclass(frozen=True)
class FuseOptions:
    """What else `fuse` takes by keyword; see its docstring."""
    combine: str = "mean"
    batch_heads: bool = False
    head_outputs: bool = False
    steps: int = DistillConfig.steps
    select: str = "cost"


def fuse(aligned: list[nn.Module], spec: PermSpec, depth: int | None = None, alpha=None,
         data: Iterable | None = None, repair: str | None = "bn", **options) -> FusedModel:
    """Partially fuse aligned models. The inputs are never modified: the result owns copies of every tensor.
    `options` are FuseOptions: `combine` ("mean" of logits or of "probs"); `batch_heads=True` runs the N heads as one network of grouped kernels (same outputs, fewer kernels);
    `head_outputs=True` adds every head's output as a second output. `repair`: "bn" (reset BatchNorm statistics),
    "repair" (REPAIR: rescale merged units to their parents' statistics, then reset BN), "lsq" (re-solve each merged
    layer by least squares towards the members' mean output, and each head's first layer towards its member, after
    an adapter where a shortcut also reads the trunk; see fuse/lsq.py and fuse/adapter.py), "distill" (BN reset, then
    `steps` steps of distillation towards the ensemble on the calibration inputs, shifted and flipped when they are
    images; `fuse/distill.py` trains on any other unlabeled set) or None. `select` ("cost" or
    "partial-ot", with alpha) decides which units stay isolated (see fuse/select.py)."""
    o = FuseOptions(**options)
    combine, batch_heads, head_outputs, steps, select = o.combine, o.batch_heads, o.head_outputs, o.steps, o.select
    check_models(aligned, "fusion")
    if alpha is not None and depth is not None:
        raise EdgefuseError("give depth= or alpha=, not both (a depth split is alpha 0 below the cut, 1 above)")
    check_select(select)
    if repair not in REPAIRS:
        raise EdgefuseError(f"unknown repair '{repair}' (choose from {', '.join(str(r) for r in REPAIRS)})")
    if alpha is not None:
        if head_outputs:
            raise EdgefuseError("head_outputs needs a depth split: with alpha, units are shared up to the logits")
        net, layouts, parents = fuse_alpha(aligned, spec, alpha, combine, select)
        fused = FusedModel(nn.Identity(), [net], combine, batched=True, n_heads=len(aligned))
        fused.widths = {g: len(lay.fused) + len(aligned) * len(lay.isolated) for g, lay in layouts.items()}
        if any(len(lay.fused) for lay in layouts.values()):  # alpha=1 is the ensemble itself: nothing to repair
            _repair(fused.eval(), repair, data, parents, spec, layouts, steps)
        return _finite(fused.eval(), repair)
    if depth is None:
        raise EdgefuseError("fuse needs depth=k (0 = ensemble, len(spec.cut_points) = full merge) or alpha=a "
                            "(1 = ensemble, 0 = full merge)")
    fused = fuse_depth(aligned, spec, depth, combine)
    if depth > 0:
        _repair(fused, repair, data, aligned, spec, None, steps)
    fused.head_outputs = head_outputs
    return _finite(fused.batch_heads() if batch_heads else fused, repair)


def _finite(fused: FusedModel, repair: str | None) -> FusedModel:
    """Averaged extreme weights or BatchNorm statistics can overflow: a NaN model is an error, never a result."""
    bad = nonfinite_tensor(fused)
    if bad is not None:
        raise EdgefuseError(f"the fused model's '{bad}' holds NaN or Inf values after fusion and repair "
                            f"'{repair}' (extreme weights in a checkpoint?)")
    return fused


def _repair(fused: FusedModel, method: str | None, data, aligned: list[nn.Module], spec: PermSpec,
            layouts: dict | None, steps: int) -> None:
    if method == "lsq":
        xs = require_batches(data, "lsq repair", aligned[0])
        bns = following_bn(aligned[0], list(spec.weight_layers))
        lsq_repair(fused, aligned, _merged_fits(fused, aligned, spec, layouts, bns), xs)
        if layouts is None:
            adapt_heads(fused, aligned, xs)
            lsq_repair(fused, aligned, _head_fits(fused, spec, bns), xs)
        return
    if method == "repair":
        rescale_units(fused, aligned, _merged_layers(fused, spec, layouts), data)
    if method == "bn" and not batchnorms(fused):
        warn_once("repair 'bn' re-estimates BatchNorm statistics and this model has no BatchNorm: the fused model "
                  "is left unrepaired (repair 'lsq' or 'repair' works without BatchNorm)")
    if method is not None:
        reset_bn(fused, data)
    if method == "distill":
        inputs = torch.cat(require_batches(data, "distillation", aligned[0]))
        distill(fused, ensemble(aligned), inputs, DistillConfig(steps=steps), label="the fused model")


def _merged_fits(fused: FusedModel, aligned: list[nn.Module], spec: PermSpec, layouts: dict | None,
                 bns: dict[str, str]) -> list[Fit]:
    """The merged layers (towards the members' mean), each followed under alpha by every member's isolated units
    of that layer (towards that member)."""
    owner = fused.trunk if layouts is None else fused.heads[0]
    everyone = tuple(range(len(aligned)))
    merged = {name: (layer, units) for _, layer, name, units in _merged_layers(fused, spec, layouts)}
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


def _merged_layers(fused: FusedModel, spec: PermSpec, layouts: dict | None) -> list:
    """(output module, layer to rescale, parents' layer name, parents' unit indices) of every merged hidden layer,
    in order: the trunk's layers for a depth split, the fused part of every MixedLayer for alpha."""
    from .neuron import MixedLayer

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


__all__ = ["DistillConfig", "FuseOptions", "FusedModel", "batch_models", "distill", "ensemble", "fuse"]
