"""The one chooser: among every candidate (members, the distilled member, the exact ensembles, fused points) it ships
the most accurate on validation data within the target's budgets, and never one that another candidate dominates.
Test data never enters the choice. A validation difference within noise is a tie, and a tie goes to the clearly
faster candidate; between a fused model and a member, distilled member or ensemble that is not clearly slower, to
the latter."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .candidate import Candidate
from ..base.errors import EdgefuseError
from ..base.tie_rule import NOISE_Z, Entry, pick, speed
from ..measure.metrics import paired_z
from ..targets import DEFAULT_BINDS, Target

MEASURED_HERE = ("onnxruntime", "cuda")  # runtimes whose latency the host measures; TensorRT's is the device's


@dataclass(frozen=True)
class Budget:
    """What the target allows. Latency budgets are per call, one per batch size (a single number applies to all);
    `max_drop` asks instead for the fastest candidate within that validation-accuracy drop from the ensemble."""
    max_macs_ratio: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    memory_mb: float | None = None
    max_drop: float | None = None
    min_auroc: float | None = None
    binds: str = DEFAULT_BINDS  # what latency and MACs budgets bind: the mean per call, or the p99 (worst-case MACs)

    def describe(self) -> str:
        worst = "worst-case " if self.binds == "p99" else ""
        parts = [f"{worst}MACs ≤ {self.max_macs_ratio:g}× the ensemble" if self.max_macs_ratio is not None else "",
                 ", ".join(f"{self.binds} latency ≤ {v:g} ms at batch {b}" for b, v in self.latency_ms.items()),
                 f"peak memory ≤ {self.memory_mb:g} MB" if self.memory_mb is not None else "",
                 f"validation accuracy within {self.max_drop:g} of the ensemble" if self.max_drop is not None else "",
                 f"misclassification-detection AUROC ≥ {self.min_auroc:g} on validation"
                 if self.min_auroc is not None else ""]
        return "; ".join(p for p in parts if p) or "no budget"

    def as_dict(self) -> dict:
        return {"max_macs_ratio": self.max_macs_ratio, "latency_ms": dict(self.latency_ms),
                "memory_mb": self.memory_mb, "max_drop": self.max_drop, "min_auroc": self.min_auroc,
                "binds": self.binds}


@dataclass(frozen=True)
class Choice:
    chosen: Candidate
    reason: str
    dominated_by: dict[str, str]  # candidate key -> key of a candidate that dominates it
    within_budget: tuple[str, ...]


def dominates(a: Candidate, b: Candidate, batches: list[str], memory: bool = False, uncertainty: bool = False,
              binds: str = DEFAULT_BINDS) -> bool:
    """`a` matches or beats `b` on validation accuracy while being no slower at every batch size (by the figure the
    budget binds: mean or p99 per call; and, when memory is budgeted, no larger; when uncertainty is asked for,
    flagging errors at least as well)."""
    return (a.accuracy >= b.accuracy and all(a.latency(x, binds) <= b.latency(x, binds) for x in batches)
            and (not memory or (a.peak_memory_mb or 0.0) <= (b.peak_memory_mb or 0.0))
            and (not uncertainty or (a.uncertainty_auroc or 0.0) >= (b.uncertainty_auroc or 0.0)))


def _speed(c: Candidate, batches: list[str], binds: str = DEFAULT_BINDS) -> float:
    return speed(_entry(c, batches, binds))


def dominance(rows: list[Candidate], batches: list[str], memory: bool = False,
              uncertainty: bool = False, binds: str = DEFAULT_BINDS) -> dict[str, str]:
    """For each dominated row, the key of its most accurate dominator. Of two rows equal on every criterion the
    first listed stands and the second is dominated, so a set of identical rows keeps exactly one."""
    out = {}
    for j, b in enumerate(rows):
        beaten_by = [a for i, a in enumerate(rows) if i != j and dominates(a, b, batches, memory, uncertainty, binds)
                     and (i < j or not dominates(b, a, batches, memory, uncertainty, binds))]
        if beaten_by:
            out[b.key] = max(beaten_by, key=lambda a: (a.accuracy, -_speed(a, batches, binds))).key
    return out


def fits(c: Candidate, budget: Budget, ensemble_macs: int) -> bool:
    """Within every budget: MACs and latency (mean or worst case, as the budget binds), memory, and the uncertainty
    criterion (the validation AUROC of the candidate's better signal, max softmax or its heads' disagreement)."""
    binds = budget.binds
    return ((budget.max_macs_ratio is None or c.cost_macs(binds) <= budget.max_macs_ratio * ensemble_macs)
            and all(c.latency(b, binds) <= v for b, v in budget.latency_ms.items())
            and (budget.memory_mb is None or (c.peak_memory_mb or 0.0) <= budget.memory_mb)
            and (budget.min_auroc is None or (c.uncertainty_auroc or 0.0) >= budget.min_auroc))


def tie_z(a: Candidate, b: Candidate) -> float | None:
    """Paired z of `a` over `b` on validation, or None when the per-sample results are not known."""
    if a.val_correct is None or b.val_correct is None or len(a.val_correct) != len(b.val_correct):
        return None
    return paired_z(a.val_correct, b.val_correct)


def _entry(c: Candidate, batches: list[str], binds: str) -> Entry:
    """The candidate as the tie rule sees it. Its network is its MACs, parameters, ONNX node count and precision:
    two members, or a member and its distilled copy, are one graph, whose latency difference is timing noise;
    an INT8 twin or the batched ensemble differs in graph, so its speed counts."""
    return Entry(c.key, c.kind, c.accuracy, {b: c.latency(b, binds) for b in batches},
                 (c.macs, c.params, c.onnx_nodes, c.precision))


def choose(rows: list[Candidate], budget: Budget, ensemble: Candidate) -> Choice:
    """The chooser. `rows` holds every candidate, the exact ensembles included; `ensemble` is the reference for
    the MACs share and for `max_drop`."""
    batches, binds = list(ensemble.latency_by_batch), budget.binds
    beaten = dominance(rows, batches, budget.memory_mb is not None, budget.min_auroc is not None, binds)
    within = [c for c in rows if fits(c, budget, ensemble.macs)]
    if budget.max_drop is not None:
        within = [c for c in within if c.accuracy >= ensemble.accuracy - budget.max_drop]
    pool = [c for c in within if c.key not in beaten]
    if within and not pool:  # every row within the budget is beaten, in the end by one outside it
        inside, by_key = {c.key for c in within}, {c.key: c for c in rows}
        winner = max((by_key[beaten[c.key]] for c in within if beaten[c.key] not in inside), key=lambda c: c.accuracy)
        raise EdgefuseError(f"every candidate within the budget ({budget.describe()}) is beaten on validation accuracy "
                            f"and latency by one outside it: {winner.label} (validation accuracy "
                            f"{winner.accuracy:.4f}, {binds} {winner.latency(batches[0], binds):.3f} ms at batch "
                            f"{batches[0]}); widen the budget to ship it")
    if not pool:
        cheapest = min(rows, key=lambda c: _speed(c, batches, binds))
        raise EdgefuseError(f"no candidate meets the budget ({budget.describe()}); the cheapest is {cheapest.label}: "
                            f"{binds} {cheapest.latency(batches[0], binds):.3f} ms at batch {batches[0]}, "
                            f"{cheapest.peak_memory_mb or float('nan'):.1f} MB, validation accuracy "
                            f"{cheapest.accuracy:.4f}")
    if budget.max_drop is not None:
        chosen = min(pool, key=lambda c: _speed(c, batches, binds))
        reason = (f"the fastest candidate within {budget.max_drop:g} of the ensemble's validation accuracy "
                  f"({chosen.accuracy:.4f} vs {ensemble.accuracy:.4f})")
        return Choice(chosen, reason, beaten, tuple(c.key for c in within))
    by_key, entry = {c.key: c for c in rows}, {c.key: _entry(c, batches, binds) for c in within}
    rule = pick([entry[c.key] for c in pool], list(entry.values()), lambda a, b: tie_z(by_key[a], by_key[b]))
    best, chosen = by_key[rule.best.key], by_key[rule.chosen.key]
    reason = (f"the most accurate on validation ({best.accuracy:.4f}) of the {len(within)} candidates within the "
              f"budget ({budget.describe()}), and no candidate is as accurate and at least as fast")
    if rule.faster and rule.yielded is None:
        z = tie_z(best, chosen)
        ratios = ", ".join(f"{chosen.latency(b, binds) / best.latency(b, binds):.2f}× at b{b}" for b in batches)
        reason = (f"ties on validation with the most accurate candidate, {best.label} ({chosen.accuracy:.4f} vs "
                  f"{best.accuracy:.4f}, {z:.1f} standard errors apart, under {NOISE_Z:g}), and is clearly faster "
                  f"({binds} latency {ratios})")
    elif rule.yielded is not None:
        fused = by_key[rule.yielded.key]
        what = "fused model" if fused.kind == "fused" else fused.kind
        reason = (f"ties on validation with the {what} that would ship, {fused.label} ({chosen.accuracy:.4f} vs "
                  f"{fused.accuracy:.4f}; and with the most accurate candidate, {best.accuracy:.4f}), and is not "
                  f"clearly slower: a {what} ships only where it beats every member, distilled member and "
                  f"ensemble at no higher cost beyond noise")
    ties = [c.label for c in pool if c is not chosen and (z := tie_z(chosen, c)) is not None and abs(z) < NOISE_Z]
    if ties:
        reason += f"; within noise of it on validation (a tie): {', '.join(ties)}"
    if chosen.kind in ("member", "distilled member"):
        reason += f"; a single {chosen.kind} ships: no fused model or ensemble within the budget does better"
    return Choice(chosen, reason, beaten, tuple(c.key for c in within))


def target_budget(tgt: Target, latency_ms: float | tuple[float, ...] | None = None, memory_mb: float | None = None,
                  max_drop: float | None = None, min_auroc: float | None = None) -> Budget:
    """The target's budgets, overridden where given. A latency budget is one figure per batch size of the target
    (a single number applies to every batch size), the mean per call or the p99 as the target's `latency_binds`
    says, and applies only where latency is measured on the target's own
    runtime (onnxruntime, or torch on this machine's CUDA GPU); a TensorRT device times the candidates itself
    (`deploy.py --choose`), so here its targets use the MACs share as their proxy."""
    if min_auroc is not None and not (isinstance(min_auroc, (int, float)) and 0 <= min_auroc <= 1):
        raise EdgefuseError(f"the minimum AUROC must be a number from 0 to 1, got {min_auroc!r}")
    for name, v in (("latency budget", latency_ms), ("memory budget", memory_mb), ("accuracy drop", max_drop)):
        values = v if isinstance(v, (tuple, list)) else () if v is None else (v,)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in values):
            raise EdgefuseError(f"the {name} must be a finite number of at least 0, got {v!r}")
    lat = latency_ms if latency_ms is not None else tgt.latency_budget_ms
    per_batch = per_batch_latency(tgt, lat if tgt.runtime in MEASURED_HERE else None)
    return Budget(tgt.max_macs_ratio, per_batch, memory_mb if memory_mb is not None else tgt.memory_budget_mb,
                  max_drop, min_auroc if min_auroc is not None else tgt.min_auroc, tgt.latency_binds)


def per_batch_latency(tgt: Target, lat: float | tuple[float, ...] | None) -> dict[str, float]:
    """A latency budget as one figure per batch size of the target: a single number applies to every batch size."""
    if lat is None:
        return {}
    values = tuple(lat) if isinstance(lat, (tuple, list)) else (lat,) * len(tgt.batch_sizes)
    if len(values) != len(tgt.batch_sizes):
        raise EdgefuseError(f"{len(values)} latency budgets for the {len(tgt.batch_sizes)} batch sizes of target "
                            f"'{tgt.name}' ({', '.join(map(str, tgt.batch_sizes))}): give one, or one per size")
    return {str(b): float(v) for b, v in zip(tgt.batch_sizes, values)}


def frontier(rows: list[Candidate], cap: int, binds: str = DEFAULT_BINDS) -> list[Candidate]:
    """The candidates no other beats on validation accuracy at no higher MACs (a cascade's mean or worst case, as
    the budget binds; an INT8 graph counts as cheaper than an FP32 one of the same MACs), cheapest first: what a
    device that times them itself chooses among. More than `cap` are thinned evenly from the cheapest to the most
    accurate."""
    def cost(c: Candidate) -> tuple[int, int]:
        return c.cost_macs(binds), 0 if c.precision == "int8" else 1

    def covers(i: int, j: int) -> bool:
        a, b = rows[i], rows[j]
        if not (all(x <= y for x, y in zip(cost(a), cost(b))) and a.accuracy >= b.accuracy):
            return False
        return a.accuracy > b.accuracy or cost(a) != cost(b) or i < j  # of equals, the first listed stands

    keep = sorted((b for j, b in enumerate(rows) if not any(covers(i, j) for i in range(len(rows)) if i != j)),
                  key=cost)
    if len(keep) <= cap:
        return keep
    return [keep[round(k * (len(keep) - 1) / (cap - 1))] for k in range(cap)]
