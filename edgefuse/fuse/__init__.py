"""Fusion of aligned models into one FusedModel (trunk + heads)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..base.validate import check_models, nonfinite_tensor
from ..base.errors import EdgefuseError
from ..spec.permspec import PermSpec
from .batched import batch_models
from .model import FusedModel, ensemble
from .neuron import fuse_alpha
from .distill import DistillConfig, distill
from .repair import DEFAULT_REPAIR, REPAIRS, RepairJob
from . import least_squares  # noqa: F401  (registers repair "lsq")
from .select import DEFAULT_SELECT, check_select
from .dense import densify
from .split import fuse_depth
from ..base.combine import DEFAULT_COMBINE


@dataclass(frozen=True)
class FuseOptions:
    """What else `fuse` takes by keyword; see its docstring."""
    combine: str = DEFAULT_COMBINE
    batch_heads: bool = False
    head_outputs: bool = False
    steps: int = DistillConfig.steps
    select: str = DEFAULT_SELECT
    dense: bool = True  # α: mixed layers as single dense layers where that is cheap (fuse/dense.py)


def fuse(aligned: list[nn.Module], spec: PermSpec, depth: int | None = None, alpha=None,
         data: Iterable | None = None, repair: str | None = DEFAULT_REPAIR, **options) -> FusedModel:
    """Partially fuse aligned models. The inputs are never modified: the result owns copies of every tensor.
    `options` are FuseOptions: `combine` ("mean" of logits or of "probs"); `batch_heads=True` runs the N heads as
    one network of grouped kernels (same outputs, fewer kernels); `head_outputs=True` adds every head's output as a
    second output. `repair` (default DEFAULT_REPAIR, "lsq"): "bn" (reset BatchNorm statistics),
    "repair" (REPAIR: rescale merged units to their parents' statistics, then reset BN), "lsq" (re-solve each merged
    layer by least squares towards the members' mean output, and each head's first layer towards its member, after
    an adapter where a shortcut also reads the trunk; see fuse/lsq.py and fuse/adapter.py), "distill" (BN reset, then
    `steps` steps of distillation towards the ensemble on the calibration inputs, shifted and flipped when they are
    images; `fuse/distill.py` trains on any other unlabeled set) or None. `select` ("cost" or
    "partial-ot", with alpha) decides which units stay isolated (see fuse/select.py); `dense` (default True) makes an
    α model's mixed layers single dense layers where that costs few extra MACs (fuse/dense.py: fewer operators,
    BatchNorm folded; the same function)."""
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
        if o.dense:
            densify(fused)
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
    REPAIRS[method].apply(RepairJob(fused, aligned, spec, layouts, data, steps))


__all__ = ["DistillConfig", "FuseOptions", "FusedModel", "batch_models", "distill", "ensemble", "fuse"]
