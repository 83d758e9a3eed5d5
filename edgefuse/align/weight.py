"""Git Re-Basin weight matching for N models, at a cost linear in N per round: MergeMany rounds re-express their
result in models[0]'s basis, and the sum of the aligned models is kept as a running total, so matching one model
to the mean of the others is one subtraction, not a fresh mean of N−1 permuted state dicts."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..base.errors import EdgefuseError
from ..spec.permspec import Axis, PermSpec, axis_index, dense_state, permute_state
from . import register
from .blocks import Solver, assign

State = dict[str, torch.Tensor]


def _float_params(model: nn.Module, spec: PermSpec) -> State:
    """Only learned parameters enter the cost: running statistics live on other scales and follow the weights.
    float32: the similarities are sums of products of weights of one scale, far from float32's limits. Grouped
    convolutions as their dense block-diagonal matrices, the layout the spec describes."""
    names = {n for n, _ in model.named_parameters()}
    state = {k: v.detach().float() for k, v in model.state_dict().items() if k in names and k in spec.params}
    return dense_state(state, spec)


def unit_rows(t: torch.Tensor, axis: int, seg: Axis) -> torch.Tensor:
    """One row per unit of the segment: its entries of `axis` (repeat of them after a flatten), everything else
    flattened."""
    t = t.movedim(axis, 0)
    if seg.stride == seg.repeat:  # contiguous: a slice, no copy
        return t[seg.start:seg.start + seg.units * seg.repeat].reshape(seg.units, -1)
    return t[seg.positions().reshape(-1)].reshape(seg.units, -1)


def lsa(similarity: np.ndarray) -> np.ndarray:
    """Exact assignment maximising total similarity: column (unit of the other model) for each row. The matrix is
    first centred (row and column means removed), which changes every assignment's total by the same constant,
    so not the optimum: BatchNorm scales add a near rank-one term to every similarity, on which scipy's solver
    is up to 5× slower (0.10 s against 0.02 s for 512 units), and centring removes most of it. When every row's
    largest entry is in a different column, that is the optimum and no solver runs."""
    best = similarity.argmax(1)
    if len(np.unique(best)) == len(best):  # every row's best column differs: no assignment can do better
        return best
    centred = similarity - similarity.mean(1, keepdims=True) - similarity.mean(0, keepdims=True)
    return linear_sum_assignment(centred, maximize=True)[1]


def similarity(a: State, b: State) -> float:
    """<a, b> over the shared parameters, summed in float64: the objective weight matching maximises."""
    return float(sum(torch.dot(a[k].reshape(-1).double(), b[k].reshape(-1).double()) for k in a))


def square_norm(a: State) -> float:
    """<a, a> in float64 without a float64 copy of every tensor (20× faster than similarity(a, a) on ResNet-18)."""
    return float(sum(torch.linalg.vector_norm(v, dtype=torch.float64) ** 2 for v in a.values()))


def _members(state: State, spec: PermSpec) -> dict[str, list]:
    return {g: [m for m in spec.members(g) if m[0] in state] for g in spec.groups}


class _Rows:
    """One model's unit rows for every (group, member), cut once per pair match: a group's similarity then needs
    only a gather of the other axes' current permutations, not re-permuted copies of whole tensors."""

    def __init__(self, state: State, spec: PermSpec, members: dict[str, list]) -> None:
        self.spec = spec
        self.rows = {(g, m): unit_rows(state[m[0]], m[1], m[2]) for g, ms in members.items() for m in ms}
        self.shapes = {(g, m): (m[2].repeat, *(s for i, s in enumerate(state[m[0]].shape) if i != m[1]))
                       for g, ms in members.items() for m in ms}

    def get(self, g: str, member: tuple, perms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The rows, with every other axis of the parameter permuted by `perms` (None: as they are). The rows are
        viewed as (unit, repeat, other axes in order), as unit_rows lays them out, and gathered along each other
        axis whole: slices of the trailing axes move together (3.5× faster than an index per entry for a 3×3
        conv)."""
        rows = self.rows[(g, member)]
        name, axis = member[0], member[1]
        others = [(i, seg) for i, seg in enumerate(self.spec.params[name]) if i != axis and seg is not None]
        if perms is None or not others:
            return rows
        view = rows.reshape(len(rows), *self.shapes[(g, member)])
        for i, segments in others:  # dim 1 of the view is the repeat, then the other axes in order
            view = view.index_select(2 + i - (i > axis), axis_index(segments, perms))
        return view.reshape(len(rows), -1)


def match_pair(target: State, other: State, spec: PermSpec, perms: dict[str, torch.Tensor],
               rng: np.random.Generator, max_iter: int = 100, solve: Solver = lsa, theirs: _Rows | None = None) -> dict:
    """Coordinate descent over groups (a family of blocks is one step, see blocks.py): each step solves its
    assignment with the others fixed, and keeps it only if it raises the similarity (so an approximate solver
    cannot make things worse); a step whose neighbours have not changed since it was last solved is skipped. Stops
    after a sweep that changes nothing, or after `max_iter` sweeps. `theirs`: `other`'s rows when the caller keeps
    them (a model matched again and again in MergeMany's rounds is cut into rows once)."""
    perms = {g: p.clone() for g, p in perms.items()}
    members = _members(target, spec)
    mine, theirs = _Rows(target, spec, members), theirs or _Rows(other, spec, members)
    coordinates = spec.coordinates()

    def similarity_of(g: str) -> np.ndarray:
        n = spec.groups[g]
        cost = torch.zeros(n, n, dtype=torch.float64)
        for m in members[g]:
            cost += (mine.get(g, m) @ theirs.get(g, m, perms).T).double()
        return cost.numpy()

    deps = [{a.group for g in f.groups for name, axis, _ in members[g]
             for i, segments in enumerate(spec.params[name]) if i != axis and segments for a in segments}
            for f in coordinates]
    changed_at = {g: 0 for g in spec.groups}  # the step at which each permutation last changed
    solved_at = [-1] * len(coordinates)
    step = 0
    for _ in range(max_iter):
        changed = False
        for k in rng.permutation(len(coordinates)):
            step += 1
            if solved_at[k] >= max((changed_at[g] for g in deps[k]), default=0):
                continue  # nothing its similarities read has changed since it was solved: same answer
            solved_at[k] = step
            family = coordinates[k]
            sims = [similarity_of(g) for g in family.groups]
            new = assign(sims, family, solve)
            rows = [np.arange(len(s)) for s in sims]
            new_sum = sum(s[r, c].sum() for s, r, c in zip(sims, rows, new))
            before = sum(s[r, perms[g].numpy()].sum() for s, r, g in zip(sims, rows, family.groups))
            if new_sum > before + 1e-7 * abs(before) + 1e-12:
                for g, c in zip(family.groups, new):
                    perms[g] = torch.from_numpy(c).long()
                    changed_at[g] = step
                changed = True
        if not changed:
            break
    return perms


@dataclass(frozen=True)
class Rounds:
    """The MergeMany schedule: the first pass (`first` "sum": each model against the sum of those aligned before
    it; "anchor": against models[0] alone) of `first_sweeps` sweeps, then at most `max_rounds` rounds of `sweeps`
    sweeps, stopping when a round gains less than `tol` of the objective."""
    max_rounds: int = 20
    tol: float = 1e-4
    sweeps: int = 1
    first_sweeps: int = 2
    first: str = "sum"

    def __post_init__(self) -> None:
        if self.first not in ("sum", "anchor"):
            raise EdgefuseError(f"unknown first pass '{self.first}' (choose from sum, anchor)")


@register("weight")
def weight_matching(models: list[nn.Module], spec: PermSpec, data=None, seed: int = 0, rounds: Rounds = Rounds(),
                    solve: Solver = lsa, history: list[float] | None = None,
                    stamps: list[float] | None = None) -> list[dict]:
    """Each model is first matched to the sum of the models aligned before it (`first_sweeps` coordinate-descent
    sweeps when rounds follow, to convergence for N = 2); then each round matches every model, models[0] too, to
    the sum of the others (`sweeps` sweeps, warm-started: the rounds do the rest of the work more cheaply), and the
    result is re-expressed in models[0]'s basis (a common permutation of all N changes neither the objective nor
    any fused function). Holding models[0] fixed instead would forbid moving the other N−1 together, and stopped
    0.007 % lower on ResNet-18s. Rounds stop when one raises the objective (the sum over model pairs of
    <aligned_i, aligned_j>) by less than `tol` of its value; `history`, if given, receives the objective after the
    first pass and after each round, `stamps` the time.perf_counter() at the start and at those moments (where the
    time goes, for benchmarks). The running sum is already close to the consensus the rounds seek, so they have
    less to do and their number stops growing with N: on ResNet-18s 1–4 rounds at N = 4, 8 and 16 against 4–7 from
    a first pass against models[0] alone, at a 0.01–0.2 % higher objective (benchmarks/align_scaling.py). On the
    trained zoo CNN it ends 0.1 % lower and fuses worse under BN reset (depth 4: 0.46 against 0.58), as well under
    lsq (0.867 against 0.860): `Rounds(first="anchor")` keeps the other schedule."""
    marks = [time.perf_counter()]
    rng = np.random.default_rng(seed)
    states = [_float_params(m, spec) for m in models]
    perms = [spec.identity_perms() for _ in models]
    aligned = list(states)
    total = {k: v.clone() for k, v in states[0].items()}
    rows = [_Rows(s, spec, _members(s, spec)) for s in states]  # each model cut into unit rows once
    for i in range(1, len(models)):  # first pass: each model against the sum so far (or models[0])
        perms[i] = match_pair(states[0] if rounds.first == "anchor" else total, states[i], spec, perms[i], rng,
                              solve=solve,
                              max_iter=rounds.first_sweeps if len(models) > 2 else 100, theirs=rows[i])
        aligned[i] = permute_state(states[i], spec, perms[i])
        for k in total:
            total[k] += aligned[i][k]
    norms = sum(square_norm(a) for a in aligned)
    objective = (square_norm(total) - norms) / 2
    trail = [objective]
    marks.append(time.perf_counter())
    for _ in range(rounds.max_rounds if len(models) > 2 else 0):
        for i in range(len(models)):
            others = {k: total[k] - aligned[i][k] for k in total}
            perms[i] = match_pair(others, states[i], spec, perms[i], rng, max_iter=rounds.sweeps, solve=solve,
                                  theirs=rows[i])
            new = permute_state(states[i], spec, perms[i])
            for k in total:
                total[k] += new[k] - aligned[i][k]
            aligned[i] = new
        previous, objective = objective, (square_norm(total) - norms) / 2
        trail.append(objective)
        marks.append(time.perf_counter())
        if objective - previous <= rounds.tol * abs(previous):
            break
    if history is not None:
        history.extend(trail)
    if stamps is not None:
        stamps.extend(marks)
    return rebase(perms)


def rebase(perms: list[dict]) -> list[dict]:
    """The same alignment with models[0] in its own order: every model's units reordered by the inverse of
    models[0]'s permutation."""
    inverse = {g: torch.argsort(p) for g, p in perms[0].items()}
    return [{g: p[inverse[g]] for g, p in pm.items()} for pm in perms]
