"""Fusion of aligned models into one FusedModel (trunk + heads)."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..checks import check_models
from ..errors import EdgefuseError
from ..spec import PermSpec
from .batched import batch_models
from .model import FusedModel, ensemble
from .repair import REPAIRS, repair as apply_repair
from .split import fuse_depth


def fuse(aligned: list[nn.Module], spec: PermSpec, depth: int | None = None, alpha=None,
         data: Iterable | None = None, repair: str | None = "bn", combine: str = "mean",
         batch_heads: bool = False, head_outputs: bool = False) -> FusedModel:
    """Partially fuse aligned models. The inputs are never modified: the result owns copies of every tensor.
    `batch_heads=True` runs the N heads as one network of grouped kernels (same outputs, fewer kernels);
    `head_outputs=True` adds every head's output as a second output."""
    check_models(aligned, "fusion")
    if alpha is not None:
        raise EdgefuseError("neuron-level fusion (alpha=...) is not available in this version; use depth=")
    if depth is None:
        raise EdgefuseError("fuse needs depth=k (0 = ensemble, len(spec.cut_points) = full merge)")
    if repair not in REPAIRS:
        raise EdgefuseError(f"unknown repair '{repair}' (choose from {', '.join(str(r) for r in REPAIRS)})")
    fused = fuse_depth(aligned, spec, depth, combine)
    if depth > 0:
        apply_repair(fused, repair, data)
    fused.head_outputs = head_outputs
    return fused.batch_heads() if batch_heads else fused


__all__ = ["FusedModel", "batch_models", "ensemble", "fuse"]
