"""Git Re-Basin weight matching, for N models: match each to models[0], then re-match each to the mean of the
others until no permutation changes (MergeMany, with models[0] held fixed so the result stays in its basis)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..spec import PermSpec, axis_index, permute_state
from . import register


def _float_params(model: nn.Module, spec: PermSpec) -> dict[str, torch.Tensor]:
    """Only learned parameters enter the cost: running statistics live on other scales and follow the weights."""
    names = {n for n, _ in model.named_parameters()}
    return {k: v.detach().double() for k, v in model.state_dict().items() if k in names and k in spec.params}


def unit_rows(t: torch.Tensor, axis: int, start: int, n: int, repeat: int) -> torch.Tensor:
    """One row per unit of the group: its segment of `axis`, everything else flattened."""
    return t.movedim(axis, 0)[start:start + n * repeat].reshape(n, -1)


Solver = Callable[[np.ndarray], np.ndarray]


def lsa(similarity: np.ndarray) -> np.ndarray:
    """Exact assignment maximising total similarity: column (unit of the other model) for each row."""
    return linear_sum_assignment(similarity, maximize=True)[1]


def match_pair(target: dict[str, torch.Tensor], other: dict[str, torch.Tensor], spec: PermSpec,
               perms: dict[str, torch.Tensor], rng: np.random.Generator, max_iter: int = 100,
               solve: Solver = lsa) -> dict:
    """Coordinate descent over groups: each step solves one group's assignment with the others fixed, and keeps
    it only if it raises the similarity (so an approximate solver cannot make things worse)."""
    perms = {g: p.clone() for g, p in perms.items()}
    members = {g: [m for m in spec.members(g) if m[0] in target] for g in spec.groups}
    for _ in range(max_iter):
        changed = False
        for g in rng.permutation(list(spec.groups)):
            n = spec.groups[g]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for name, axis, start, repeat in members[g]:
                b = other[name]
                for i, segments in enumerate(spec.params[name]):
                    if i != axis and segments is not None:
                        b = b.index_select(i, axis_index(segments, perms))
                cost += unit_rows(target[name], axis, start, n, repeat) @ unit_rows(b, axis, start, n, repeat).T
            c = cost.numpy()
            cols = solve(c)
            old = perms[g].numpy()
            if c[np.arange(n), cols].sum() > c[np.arange(n), old].sum() + 1e-12:
                perms[g] = torch.from_numpy(cols).long()
                changed = True
        if not changed:
            break
    return perms


@register("weight")
def weight_matching(models: list[nn.Module], spec: PermSpec, data=None, seed: int = 0,
                    max_rounds: int = 20, solve: Solver = lsa) -> list[dict]:
    rng = np.random.default_rng(seed)
    states = [_float_params(m, spec) for m in models]
    perms = [spec.identity_perms() for _ in models]
    for i in range(1, len(models)):
        perms[i] = match_pair(states[0], states[i], spec, perms[i], rng, solve=solve)
    if len(models) > 2:
        for _ in range(max_rounds):
            changed = False
            aligned = [permute_state(s, spec, p) for s, p in zip(states, perms)]
            for i in range(1, len(models)):
                others = [aligned[j] for j in range(len(models)) if j != i]
                mean = {k: sum(s[k] for s in others) / len(others) for k in states[0]}
                new = match_pair(mean, states[i], spec, perms[i], rng, solve=solve)
                if any(not torch.equal(new[g], perms[i][g]) for g in new):
                    changed = True
                    perms[i] = new
                    aligned[i] = permute_state(states[i], spec, new)
            if not changed:
                break
    return perms
