"""Activation matching: pair units whose activations correlate over calibration data. Each group is observed at
its probe node; cross-covariances of every model pair are accumulated in one pass, so N models cost N forward
passes per batch and no activations are stored."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..models.data import require_batches
from ..base.errors import warn_once
from ..spec.permspec import PermSpec
from . import register
from .blocks import assign
from .weight import lsa, weight_matching


class _Probe(fx.Interpreter):
    """Runs a traced model and keeps each group's channels at its probe node as a (samples, units) matrix."""

    def __init__(self, gm: fx.GraphModule, probes: dict[str, list[tuple[str, torch.Tensor]]]) -> None:
        super().__init__(gm)
        self.probes = probes  # node name → [(group, channel axis, its channels there)]
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for g, axis, channels in self.probes.get(n.name, ()):
            self.seen[g] = out.movedim(axis, -1).reshape(-1, out.shape[axis])[:, channels].double()
        return out


def correlations(models: list[nn.Module], spec: PermSpec, xs: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per group, an (N, N, units, units) array: correlation of model i's unit u with model j's unit v. Every group
    has a probe (activation_matching hands models with unobservable groups to weight matching)."""
    by_node: dict[str, list] = {}
    for g, (node, start, stride, axis) in spec.probes.items():
        by_node.setdefault(node, []).append((g, axis, start + torch.arange(spec.groups[g]) * stride))
    gms = [fx.symbolic_trace(m) for m in models]
    n = len(models)
    sums = {g: [torch.zeros(k, dtype=torch.float64) for _ in models] for g, k in spec.groups.items()}
    sq = {g: [torch.zeros(k, dtype=torch.float64) for _ in models] for g, k in spec.groups.items()}
    cross = {g: torch.zeros(n, n, k, k, dtype=torch.float64) for g, k in spec.groups.items()}
    count = dict.fromkeys(spec.groups, 0)
    with torch.no_grad():
        for x in xs:
            seen = []
            for gm in gms:
                probe = _Probe(gm, by_node)
                probe.run(x)
                seen.append(probe.seen)
            for g in spec.groups:
                acts = [s[g] for s in seen]
                count[g] += acts[0].shape[0]
                for i in range(n):
                    sums[g][i] += acts[i].sum(0)
                    sq[g][i] += (acts[i] ** 2).sum(0)
                    for j in range(i, n):  # the (j, i) block is the transpose, filled in below
                        cross[g][i, j] += acts[i].T @ acts[j]
    out = {}
    for g in spec.groups:
        for i in range(n):
            for j in range(i):
                cross[g][i, j] = cross[g][j, i].T
        mean = torch.stack(sums[g]) / count[g]
        std = (torch.stack(sq[g]) / count[g] - mean ** 2).clamp_min(0).sqrt() + 1e-8
        cov = cross[g] / count[g] - mean[:, None, :, None] * mean[None, :, None, :]
        out[g] = (cov / (std[:, None, :, None] * std[None, :, None, :])).numpy()
    return out


@register("activation")
def activation_matching(models: list[nn.Module], spec: PermSpec, data: Iterable | None = None, seed: int = 0,
                        max_rounds: int = 20) -> list[dict]:
    """Match each model to models[0], then each to the mean of the others' aligned units until nothing changes. A
    family of blocks (grouped convolutions, attention heads) is matched as one, keeping its blocks whole. Where
    some units never appear in the graph (Q, K and V inside nn.MultiheadAttention), weight matching aligns the
    models instead, and says so once."""
    hidden = sorted(set(spec.groups) - set(spec.probes))
    if hidden:
        warn_once(f"activation matching cannot observe {len(hidden)} group(s) computed inside a layer ({hidden[0]}"
                  f"{', …' if len(hidden) > 1 else ''}): weight matching aligns these models instead")
        return weight_matching(models, spec, seed=seed)
    corr = correlations(models, spec, require_batches(data, "activation matching", models[0]))
    n = len(models)
    perms = [spec.identity_perms() for _ in models]

    def update(i: int, family, sims: list[np.ndarray]) -> bool:
        new = [torch.from_numpy(c).long() for c in assign(sims, family, lsa)]
        changed = any(not torch.equal(p, perms[i][g]) for p, g in zip(new, family.groups))
        perms[i].update(zip(family.groups, new))
        return changed

    for family in spec.coordinates():
        for i in range(1, n):
            update(i, family, [corr[g][0, i] for g in family.groups])
        for _ in range(max_rounds if n > 2 else 0):
            changed = False
            for i in range(1, n):
                sims = [sum(corr[g][j, i][perms[j][g].numpy()] for j in range(n) if j != i) for g in family.groups]
                changed |= update(i, family, sims)
            if not changed:
                break
    return perms
