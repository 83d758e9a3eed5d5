"""Permutation specs derived from the traced graph: which parameter axes must share one permutation of hidden units."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.fx as fx
from torch import nn

from .errors import EdgefuseError
from .trace import FIXED, GroupTracer, trace


@dataclass(frozen=True)
class Axis:
    """One segment of a parameter axis: `units` units of `group` (None: never permuted), each spanning `repeat`
    consecutive entries (conv → flatten). An axis is a tuple of segments, several after a channel `cat`."""
    group: str | None
    repeat: int = 1
    units: int = 0


@dataclass(frozen=True)
class PermSpec:
    """Permutation groups of a model. `params` maps state-dict keys to, per tensor axis, a tuple of `Axis`
    segments or None; `cut_points` are fx node names, in order, where a single tensor carries everything
    downstream needs; `probes` name, per group, the last node whose channels are exactly that group (where
    activation matching observes it)."""
    groups: MappingProxyType
    params: MappingProxyType
    cut_points: tuple[str, ...]
    weight_layers: tuple[str, ...] = field(default=())
    probes: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def members(self, group: str) -> list[tuple[str, int, int, int]]:
        """(param, axis, start, repeat) for every parameter axis segment the group permutes."""
        out = []
        for p, axes in self.params.items():
            for i, segments in enumerate(axes):
                start = 0
                for a in segments or ():
                    if a.group == group:
                        out.append((p, i, start, a.repeat))
                    start += a.units * a.repeat
        return out

    def random_perms(self, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {g: torch.randperm(n, generator=gen) for g, n in self.groups.items()}

    def identity_perms(self) -> dict[str, torch.Tensor]:
        return {g: torch.arange(n) for g, n in self.groups.items()}


def expand(perm: torch.Tensor, repeat: int) -> torch.Tensor:
    """Permutation of units → permutation of the `repeat`-wide blocks that flatten made of them."""
    if repeat == 1:
        return perm
    return (perm[:, None] * repeat + torch.arange(repeat)).reshape(-1)


def axis_index(segments: tuple[Axis, ...], perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The index that permutes one parameter axis: each segment permuted by its group, shifted to its place."""
    parts, start = [], 0
    for a in segments:
        size = a.units * a.repeat
        idx = expand(perms[a.group], a.repeat) if a.group in perms else torch.arange(size)
        parts.append(idx + start)
        start += size
    return torch.cat(parts)


def permute_state(state: dict[str, torch.Tensor], spec: PermSpec,
                  perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permuted copy of `state`; keys outside the spec, and spec keys absent from `state`, are left alone."""
    out = dict(state)
    for name, axes in spec.params.items():
        if name not in state:
            continue
        t = state[name]
        for i, segments in enumerate(axes):
            if segments is not None and any(a.group in perms for a in segments):
                t = t.index_select(i, axis_index(segments, perms))
        out[name] = t
    return out


def permute(model: nn.Module, spec: PermSpec, perms: dict[str, torch.Tensor]) -> nn.Module:
    """A new module whose hidden units are reordered by `perms`: the same function, different weights."""
    unknown = set(perms) - set(spec.groups)
    if unknown:
        raise EdgefuseError(f"permutation for unknown group(s): {', '.join(sorted(unknown))}")
    new = copy.deepcopy(model)
    new.load_state_dict(permute_state(model.state_dict(), spec, perms))
    return new


def _cut_points(gm: fx.GraphModule, weight_layers: list[fx.Node], value: dict) -> list[str]:
    """Places just before each weight layer (but the first) where one grouped tensor is all that flows on."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    cuts = []
    for layer in weight_layers[1:]:
        i = index[layer] - 1
        live = [n for n in nodes[:i + 1] if n.op != "get_attr" and last_use[n] > i]
        if len(live) == 1 and value.get(live[0]) is not None and live[0].name not in cuts:
            cuts.append(live[0].name)
    return cuts


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermSpec:
    """Derive the PermSpec of `model` by tracing it on `example_input`; unsupported ops raise UnsupportedModelError.
    Reading a model never changes it: one in training mode (or with a submodule in it) is traced as an eval-mode
    copy, since running it would update its BatchNorm statistics."""
    if any(m.training for m in model.modules()):
        model = copy.deepcopy(model).eval()
    gm = trace(model, example_input)
    t = GroupTracer(gm)
    t.run()
    groups: dict[str, int] = {}
    params: dict[str, tuple] = {}
    for p, axes in t.axes.items():
        resolved = []
        for segments in axes:
            roots = [(t.find(g), r, t.sizes[g]) for g, r in segments or ()]
            if all(root == FIXED for root, _, _ in roots):
                resolved.append(None)
                continue
            resolved.append(tuple(Axis(None if root == FIXED else root, r, n) for root, r, n in roots))
            groups.update((root, n) for root, _, n in roots if root != FIXED)
        if any(a is not None for a in resolved):
            params[p] = tuple(resolved)
    probes = {}
    for node, value in t.value.items():
        if value is not None and len(value) == 1 and value[0][1] == 1 and t.find(value[0][0]) in groups:
            probes[t.find(value[0][0])] = node.name
    return PermSpec(groups=MappingProxyType(groups), params=MappingProxyType(params),
                    cut_points=tuple(_cut_points(gm, t.weight_layers, t.value)),
                    weight_layers=tuple(n.target for n in t.weight_layers), probes=MappingProxyType(probes))
