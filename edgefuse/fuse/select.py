"""Which units of each permutation group stay isolated at a given α, and which are fused.

"cost": on the alignment already found, the α·n units whose weights spread most across the models stay isolated.
"partial-ot": the paper's rule. Per group, each model is matched to the mean of the others (weight matching's
similarity, so α=0 would keep the alignment) by exact partial optimal transport (POT's `partial_wasserstein`,
whose dummy point is the sink that absorbs the unmatched mass), so only the best (1−α)·n pairs are matched at all;
the units the sinks take most often (over the N−1 models) stay isolated, and each model's partners for the fused
units are re-chosen by assignment (scipy's linear_sum_assignment) among all its units. With 2 models this is the
paper's partial OT; with N it keeps one fused set shared by every model, which the [fused | isolated per model]
layout needs."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..align.weight import unit_rows
from ..base.errors import EdgefuseError
from ..base.hooks import optional
from ..spec.permspec import Family, PermSpec, dense_state, permute

SELECTIONS = ("cost", "partial-ot")
DEFAULT_SELECT = "cost"


@dataclass(frozen=True)
class Layout:
    """Which units of a group are fused and which isolated (indices into the aligned models' units)."""
    group: str | None
    fused: torch.Tensor
    isolated: torch.Tensor


def tensor_layout(segments: tuple, layouts: dict[str, Layout], label: str) -> Layout:
    """The layout of a tensor whose channels hold several groups (a layer's output cut into pieces by a chunk, a
    shuffled tensor): every group's fused, then isolated, units at their channel positions, in segment order."""
    if len(segments) == 1 and segments[0].start == 0 and segments[0].stride == 1:
        return layouts[segments[0].group]
    return Layout(label, torch.cat([a.start + layouts[a.group].fused * a.stride for a in segments]),
                  torch.cat([a.start + layouts[a.group].isolated * a.stride for a in segments]))


def unit_features(models: list[nn.Module], spec: PermSpec, group: str, scaled: bool = True) -> torch.Tensor:
    """(N, n, d): every parameter the group touches (incoming and outgoing weights, norms) per unit. `scaled`: each
    parameter scaled to unit mean square so no layer dominates, running statistics included; else the learned
    parameters as they are (weight matching's objective). Grouped convolutions as dense block-diagonal matrices."""
    states = [dense_state(m.state_dict(), spec) for m in models]
    learned = {name for name, _ in models[0].named_parameters()}
    parts = []
    for param, axis, seg in spec.members(group):
        if not scaled and param not in learned:
            continue
        t = torch.stack([unit_rows(s[param].double(), axis, seg) for s in states])
        parts.append(t / max(float((t ** 2).mean()), 1e-12) ** 0.5 if scaled else t)
    return torch.cat(parts, 2)


def unit_costs(models: list[nn.Module], spec: PermSpec, group: str) -> torch.Tensor:
    """Per aligned unit: the spread of the models' weights around their mean (the paper's matching cost, evaluated
    on the matching alignment already found)."""
    f = unit_features(models, spec, group)
    return ((f - f.mean(0)) ** 2).sum((0, 2))


def check_select(select: str) -> None:
    if select not in SELECTIONS:
        raise EdgefuseError(f"unknown unit selection '{select}' (choose from {', '.join(SELECTIONS)})")


def _isolated_counts(spec: PermSpec, alpha: float | Mapping[str, float]) -> dict[str, int]:
    per_group = alpha if isinstance(alpha, Mapping) else {g: alpha for g in spec.groups}
    unknown = set(per_group) - set(spec.groups)
    if unknown:
        raise EdgefuseError(f"alpha names unknown group(s): {', '.join(sorted(map(repr, unknown)))} (the groups are "
                            f"named by strings: {', '.join(map(repr, spec.groups))})")
    counts = {}
    for g, n in spec.groups.items():
        a = float(per_group.get(g, 0.0))
        if not 0.0 <= a <= 1.0 or math.isnan(a):
            raise EdgefuseError(f"alpha must be between 0 and 1, got {a} for group {g}")
        counts[g] = int(math.floor(a * n + 0.5))
    return counts


def _partial_ot(models: list[nn.Module], spec: PermSpec, group: str, k: int) -> tuple[list[nn.Module], Layout]:
    from scipy.optimize import linear_sum_assignment

    ot = optional("ot", "POT", "partial-ot unit selection")

    n = spec.groups[group]
    f = unit_features(models, spec, group, scaled=False).numpy()
    # weight matching's similarity of each model (but the reference) to the mean of the others
    sims = [(f.sum(0) - f[m]) / (len(models) - 1) @ f[m].T for m in range(1, len(models))]
    sunk = np.zeros(n)
    for s in sims:
        cost = (s.max() - s) / max(float(s.max() - s.min()), 1e-12)
        plan = ot.partial.partial_wasserstein(np.ones(n), np.ones(n), cost, m=float(n - k))
        sunk += plan.sum(1) < 0.5
    order = np.lexsort((sum(np.diag(s) for s in sims), -sunk))  # most often sunk first, then the least similar
    isolated, fused = np.sort(order[:k]), np.sort(order[k:])
    out = [models[0]]
    for model, s in zip(models[1:], sims):
        _, partners = linear_sum_assignment(s[fused], maximize=True)
        perm = np.empty(n, dtype=np.int64)
        perm[fused] = partners
        perm[isolated] = np.setdiff1d(np.arange(n), partners)
        out.append(permute(model, spec, {group: torch.from_numpy(perm)}))
    return out, Layout(group, torch.from_numpy(fused), torch.from_numpy(isolated))


def _block_layouts(models: list[nn.Module], spec: PermSpec, family: Family,
                   counts: dict[str, int]) -> dict[str, Layout]:
    """A family of blocks (a grouped convolution's input and output) isolates whole blocks, the same ones in every
    group, so each block of the grouped convolution stays whole: the blocks whose units spread most across the
    models (summed over the family), as many as the largest α of the family's groups asks for. Used by both
    selections: partial OT's re-matching would break blocks apart."""
    share = max(counts[g] / spec.groups[g] for g in family.groups)
    k = int(math.floor(share * family.blocks + 0.5))
    cost = sum(unit_costs(models, spec, g).reshape(family.blocks, -1).sum(1) for g in family.groups)
    order = torch.argsort(cost, descending=True, stable=True)
    isolated, fused = order[:k].sort().values, order[k:].sort().values
    out = {}
    for g in family.groups:
        width = spec.groups[g] // family.blocks
        units = torch.arange(spec.groups[g]).reshape(family.blocks, width)
        out[g] = Layout(g, units[fused].reshape(-1), units[isolated].reshape(-1))
    return out


def choose_layouts(models: list[nn.Module], spec: PermSpec, alpha: float | Mapping[str, float],
                   select: str = DEFAULT_SELECT) -> tuple[list[nn.Module], dict[str, Layout]]:
    """(the models, re-permuted where `select` re-matches them; {group: Layout}) with floor(α·n + 0.5) isolated
    units per group."""
    check_select(select)
    counts = _isolated_counts(spec, alpha)
    layouts = {}
    for family in spec.families:
        layouts.update(_block_layouts(models, spec, family, counts))
    for g, k in counts.items():
        if g in layouts:
            continue
        if select == "partial-ot" and 0 < k < spec.groups[g] and len(models) > 1:
            models, layouts[g] = _partial_ot(models, spec, g, k)
            continue
        order = torch.argsort(unit_costs(models, spec, g), descending=True, stable=True)
        layouts[g] = Layout(g, order[k:].sort().values, order[:k].sort().values)
    return models, layouts
