"""Merges of fine-tunes of one pretrained network: the members' weights combined into one network of a member's
size, with no alignment (fine-tunes of one base share its basin, where alignment can only return the identity).
Each merge is a registered entry with its parameters, the values tried on validation and the default (the first),
as mergekit registers its merges: the uniform soup (Wortsman et al., 2022), task arithmetic (Ilharco et al., 2023:
the base plus a scaled task vector; below 1 it blends back towards the base as WiSE-FT does) and TIES (Yadav et al.,
2023: task vectors trimmed to their largest entries, a sign elected per weight, the agreeing entries averaged).
BatchNorm statistics are averaged here and re-estimated by the caller's repair."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

import torch
from torch import nn

from ..base.errors import EdgefuseError, warn_once

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Merge:
    """A merge of N state dicts (with the base's where `needs_base`): `grid` maps each parameter to the values tried
    on validation, the first being the default."""
    name: str
    combine: Callable[..., torch.Tensor]
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    needs_base: bool = False
    what: str = ""

    def settings(self) -> list[dict[str, float]]:
        """Every combination of the grid's values, the default first."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in product(*(self.grid[k] for k in keys))]

    def defaults(self) -> dict[str, float]:
        return {k: v[0] for k, v in self.grid.items()}


MERGES: dict[str, Merge] = {}


def register(name: str, grid: dict[str, tuple[float, ...]] | None = None, needs_base: bool = False,
             what: str = "") -> Callable:
    def deco(fn: Callable) -> Callable:
        MERGES[name] = Merge(name, fn, grid or {}, needs_base, what)
        return fn
    return deco


@register("soup", what="uniform soup: the mean of the members' weights")
def _soup(tensors: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    return tensors.mean(0)


@register("task-arithmetic", {"scale": (1.0, 0.5, 0.75, 1.5, 2.0)}, needs_base=True,
          what="the base plus `scale` times the members' mean task vector (1: the soup; below 1 towards the base)")
def _task_arithmetic(tensors: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    return base + scale * (tensors - base).mean(0)


@register("ties", {"density": (0.2, 0.5, 0.8), "scale": (1.0, 1.5)}, needs_base=True,
          what="each task vector trimmed to its `density` largest entries, a sign elected per weight by the trimmed "
               "sum, the entries of that sign averaged, added to the base times `scale`")
def _ties(tensors: torch.Tensor, base: torch.Tensor, density: float, scale: float) -> torch.Tensor:
    tau = (tensors - base).flatten(1)
    keep = max(1, round(density * tau.shape[1]))
    cut = tau.abs().kthvalue(tau.shape[1] - keep + 1, dim=1, keepdim=True).values if keep < tau.shape[1] else 0.0
    trimmed = torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + scale * merged.reshape(base.shape)


def merge_states(states: list[State], base: State | None, merge: str, params: dict[str, float] | None = None,
                 learned: set[str] | None = None) -> State:
    """One state dict: `merge` applied to every learned tensor (names in `learned`; all floating ones when None),
    other floating tensors (BatchNorm statistics) averaged, integer ones (batch counters) taken from the first."""
    m = MERGES.get(merge)
    if m is None:
        raise EdgefuseError(f"unknown merge '{merge}' (available: {', '.join(MERGES)})")
    if m.needs_base and base is None:
        raise EdgefuseError(f"merge '{merge}' needs the base the members were fine-tuned from (--base)")
    params = m.defaults() | (params or {})
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        stack = torch.stack([s[name].float() for s in states])
        if learned is not None and name not in learned:
            out[name] = stack.mean(0).to(first.dtype)
            continue
        ref = base[name].float() if base is not None and name in base else None
        if m.needs_base and (ref is None or ref.shape != first.shape):  # a head the members added to the base
            warn_once(f"the base has no tensor '{name}' of shape {tuple(first.shape)} (a new head?): merges against "
                      "the base use the members' mean there")
            out[name] = stack.mean(0).to(first.dtype)
            continue
        out[name] = m.combine(stack, ref, **params).to(first.dtype)
    return out


def merged_model(models: list[nn.Module], base: State | None, merge: str,
                 params: dict[str, float] | None = None) -> nn.Module:
    """A new module of the members' architecture holding their merge (`base`: the pretrained weights, where known);
    the members are not modified."""
    learned = {n for n, _ in models[0].named_parameters()}
    states = [m.state_dict() for m in models]
    new = copy.deepcopy(models[0])
    new.load_state_dict(merge_states(states, base, merge, params, learned))
    return new.eval()
