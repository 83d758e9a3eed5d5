"""Permutation specs derived from the traced graph: which parameter axes must share one permutation of hidden units."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.fx as fx
from torch import nn

from ..base.errors import EdgefuseError, UnsupportedModelError
from .groups import GroupTracer
from .layouts import Tokens
from .tokens import layout_segments
from .trace import FIXED, trace


@dataclass(frozen=True)
class Axis:
    """One segment of a parameter axis: `units` units of `group` (None: never permuted), unit u spanning the
    `repeat` entries from start + u·stride (repeat > 1 after conv → flatten, stride > repeat after a channel
    shuffle). An axis is a tuple of segments, several after a channel `cat`, `chunk` or shuffle."""
    group: str | None
    repeat: int = 1
    units: int = 0
    start: int = 0
    stride: int = 1

    def positions(self) -> torch.Tensor:
        """(units, repeat): the entries of every unit."""
        return self.start + torch.arange(self.units)[:, None] * self.stride + torch.arange(self.repeat)


@dataclass(frozen=True)
class Family:
    """Groups that move whole blocks together. A grouped convolution of `blocks` groups maps input block j to output
    block j only, so its input and output groups share one permutation of the blocks (σ), and each group permutes
    freely inside each block. `fixed`: σ is the identity (a member is tied to the model's input or output)."""
    groups: tuple[str, ...]
    blocks: int
    fixed: bool = False


@dataclass(frozen=True)
class PermSpec:
    """Permutation groups of a model. `params` maps state-dict keys to, per tensor axis, a tuple of `Axis`
    segments or None; `cut_points` are fx node names, in order, where a single tensor carries everything
    downstream needs; `probes` give, per group, the last node that carries it unflattened, as (node, first
    channel, stride, channel axis): activation matching observes it there; `families` tie groups into blocks
    (grouped convolutions, attention heads), and `grouped` maps each grouped convolution's weight to (groups, input
    channels): `params` describes it as the dense block-diagonal matrix it stands for (see `dense_state`)."""
    groups: MappingProxyType
    params: MappingProxyType
    cut_points: tuple[str, ...]
    weight_layers: tuple[str, ...] = field(default=())
    probes: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    families: tuple[Family, ...] = field(default=())
    grouped: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __reduce__(self):
        """Pickles (to a worker process) as plain dicts, rebuilt read-only: the spec travels with a job, so no
        worker traces the model again."""
        return _rebuild, (dict(self.groups), dict(self.params), self.cut_points, self.weight_layers,
                          dict(self.probes), self.families, dict(self.grouped))

    def coordinates(self) -> list[Family]:
        """Every group once: the families of blocks, then each free group as a family of one block."""
        tied = {g for f in self.families for g in f.groups}
        return list(self.families) + [Family((g,), 1) for g in self.groups if g not in tied]

    def members(self, group: str) -> list[tuple[str, int, Axis]]:
        """(param, axis, segment) for every parameter axis segment the group permutes."""
        return [(p, i, a) for p, axes in self.params.items() for i, segments in enumerate(axes)
                for a in segments or () if a.group == group]

    def random_perms(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random permutation of every group that keeps the function: blocks move together within a family."""
        gen = torch.Generator().manual_seed(seed)
        perms = {}
        for f in self.coordinates():
            sigma = torch.arange(f.blocks) if f.fixed else torch.randperm(f.blocks, generator=gen)
            for g in f.groups:
                width = self.groups[g] // f.blocks
                perms[g] = block_perm(sigma, [torch.randperm(width, generator=gen) for _ in range(f.blocks)])
        return perms

    def identity_perms(self) -> dict[str, torch.Tensor]:
        return {g: torch.arange(n) for g, n in self.groups.items()}


def _rebuild(groups, params, cut_points, weight_layers, probes, families, grouped) -> PermSpec:
    return PermSpec(MappingProxyType(groups), MappingProxyType(params), cut_points, weight_layers,
                    MappingProxyType(probes), families, MappingProxyType(grouped))


def block_perm(sigma: torch.Tensor, inner: list[torch.Tensor]) -> torch.Tensor:
    """Block j of the result is block sigma[j] of the units, reordered inside by inner[j]."""
    width = len(inner[0])
    return torch.cat([int(s) * width + torch.as_tensor(p, dtype=torch.long) for s, p in zip(sigma, inner)])


def _dense(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """(out, in/blocks, …) grouped-conv weight → (out, in, …) block-diagonal matrix."""
    out, width = t.shape[:2]
    j = torch.arange(blocks)
    d = t.new_zeros(blocks, out // blocks, blocks, width, *t.shape[2:])
    d[j, :, j] = t.reshape(blocks, out // blocks, width, *t.shape[2:])
    return d.reshape(out, blocks * width, *t.shape[2:])


def _compact(d: torch.Tensor, blocks: int) -> torch.Tensor:
    """The inverse of `_dense`: the diagonal blocks, as a grouped-conv weight."""
    out, cin = d.shape[:2]
    j = torch.arange(blocks)
    return d.reshape(blocks, out // blocks, blocks, cin // blocks, *d.shape[2:])[j, :, j].reshape(
        out, cin // blocks, *d.shape[2:])


def dense_state(state: dict[str, torch.Tensor], spec: PermSpec) -> dict[str, torch.Tensor]:
    """`state` with every grouped-conv weight as its dense block-diagonal matrix, the layout `params` describes, so
    that similarities and unit rows need no special case. `permute_state` keeps a dense weight dense."""
    out = dict(state)
    for name, (blocks, cin) in spec.grouped.items():
        if name in out and out[name].shape[1] != cin:
            out[name] = _dense(out[name], blocks)
    return out


def expand(perm: torch.Tensor, repeat: int) -> torch.Tensor:
    """Permutation of units → permutation of the `repeat`-wide blocks that flatten made of them."""
    if repeat == 1:
        return perm
    return (perm[:, None] * repeat + torch.arange(repeat)).reshape(-1)


def axis_index(segments: tuple[Axis, ...], perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The index that permutes one parameter axis: the entries of each segment's units reordered by its group."""
    idx = torch.arange(sum(a.units * a.repeat for a in segments))
    for a in segments:
        if a.group in perms:
            pos = a.positions()
            idx[pos.reshape(-1)] = pos[perms[a.group]].reshape(-1)
    return idx


def permute_state(state: dict[str, torch.Tensor], spec: PermSpec,
                  perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permuted copy of `state`; keys outside the spec, and spec keys absent from `state`, are left alone."""
    out = dict(state)
    for name, axes in spec.params.items():
        if name not in state:
            continue
        t = state[name]
        compact = name in spec.grouped and t.shape[1] != spec.grouped[name][1]
        if compact:
            t = _dense(t, spec.grouped[name][0])
        for i, segments in enumerate(axes):
            if segments is not None and any(a.group in perms for a in segments):
                t = t.index_select(i, axis_index(segments, perms))
        out[name] = _compact(t, spec.grouped[name][0]) if compact else t
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
    """Places just before each weight layer (but the first), and before each LayerNorm after it (a pre-norm
    transformer block's boundary), where one grouped tensor is all that flows on."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    modules = dict(gm.named_modules())
    starts = {index[layer] for layer in weight_layers[1:]} | {
        index[n] for n in nodes if n.op == "call_module" and isinstance(modules[n.target], nn.LayerNorm)
        and weight_layers and index[n] > index[weight_layers[0]]}
    cuts = []
    for start in sorted(starts):
        i = start - 1
        live = [n for n in nodes[:i + 1] if n.op != "get_attr" and last_use[n] > i]
        if len(live) == 1 and isinstance(value.get(live[0]), (tuple, Tokens)) and live[0].name not in cuts:
            cuts.append(live[0].name)
    return cuts


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermSpec:
    """Derive the PermSpec of `model` by tracing it on `example_input`; unsupported ops raise UnsupportedModelError.
    Reading a model never changes it: one in training mode (or with a submodule in it) is traced as an eval-mode
    copy, since running it would update its BatchNorm statistics."""
    if any(m.training for m in model.modules()):
        model = copy.deepcopy(model).eval()
    gm = trace(model, example_input)
    t = GroupTracer.resolve(gm)
    groups: dict[str, int] = {}
    params: dict[str, tuple] = {}
    for p, axes in t.axes.items():
        resolved = []
        for segments in axes:
            if all(t.find(s.group) == FIXED for s in segments or ()):
                resolved.append(None)
                continue
            resolved.append(tuple(Axis(None if t.find(s.group) == FIXED else t.find(s.group), s.repeat, s.units,
                                       s.start, s.stride) for s in sorted(segments, key=lambda s: s.start)))
            groups.update((a.group, a.units) for a in resolved[-1] if a.group is not None)
        if any(a is not None for a in resolved):
            params[p] = tuple(resolved)
    probes = {}
    for node, value in t.value.items():
        axis = 1 if isinstance(value, tuple) else -1 if isinstance(value, Tokens) else None
        for s in (s for segs in layout_segments(value) for s in segs) if axis is not None else ():
            if s.repeat == 1 and t.find(s.group) in groups:
                probes[t.find(s.group)] = (node.name, s.start, s.stride, axis)
    return PermSpec(groups=MappingProxyType(groups), params=MappingProxyType(params),
                    cut_points=tuple(_cut_points(gm, t.weight_layers, t.value)),
                    weight_layers=tuple(n.target for n in t.weight_layers), probes=MappingProxyType(probes),
                    families=_families(t, groups), grouped=MappingProxyType(dict(t.grouped)))


def _families(t: GroupTracer, groups: dict[str, int]) -> tuple[Family, ...]:
    """Groups tied by grouped convolutions (and GroupNorms), united; a family tied to FIXED keeps its blocks in
    place. A group feeding layers of different block counts is refused."""
    parent: dict[str, str] = {FIXED: FIXED}
    blocks: dict[str, int] = {}

    def find(g: str) -> str:
        while parent.setdefault(g, g) != g:
            g = parent[g]
        return g

    for src, out, count, node in t.ties:
        ends = [FIXED if g is None else t.find(g) for g in (src, out)]
        for e in ends:
            if e != FIXED and blocks.setdefault(e, count) != count:
                raise UnsupportedModelError(node.name, type(t.modules.get(node.target)).__name__,
                                            f"its channels also meet a layer of {blocks[e]} groups, not {count}")
        a, b = sorted((find(ends[0]), find(ends[1])), key=lambda r: r != FIXED)
        parent[b] = a
    members: dict[str, list[str]] = {}
    for g in blocks:
        if g in groups:
            members.setdefault(find(g), []).append(g)
    return tuple(Family(tuple(gs), blocks[gs[0]], fixed=root == FIXED) for root, gs in members.items())
