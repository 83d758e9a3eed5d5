"""The chooser's rule once a pool of fitting candidates is known: the most accurate on validation; a clearly faster
candidate within noise of it instead; and where that pick is a fused model, a cascade or a merge, a plainer model
(member, distilled member, ensemble) that ties with it and with the most accurate and is not clearly slower. Plain
Python over plain records, so that the host's chooser (run/choose.py) and the device's (`deploy.py --choose`, where
this file is copied into the bundle as tie_rule.py) apply one rule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

NOISE_Z = 2.0  # two standard errors of the paired difference: below this, two accuracies are a tie
FASTER = 0.9  # "clearly faster": the bound latency at most 90 % of the other's at every batch size (noise is a few %)
PLAIN = ("member", "distilled member", "sub-ensemble", "ensemble")  # kinds that win a tie with a fused model
TIE_YIELDS = ("fused", "cascade", "merge")  # kinds that give way, on a tie, to a plain kind that is not clearly slower


@dataclass(frozen=True)
class Entry:
    """A candidate as the rule sees it: `latency` is the figure the budget binds (mean or p99 per call) per batch
    size; `network` names its graph (MACs, parameters, nodes, precision) where known: two entries of one network
    differ in latency only by timing noise, which cannot break a tie."""
    key: str
    kind: str
    accuracy: float
    latency: dict[str, float]
    network: tuple | None = None


@dataclass(frozen=True)
class Pick:
    best: Entry  # the most accurate in the pool (the fastest of equals)
    chosen: Entry
    faster: bool  # a clearly faster candidate within noise of `best` took its place
    yielded: Entry | None  # the fused model, cascade or merge that gave way to a plainer `chosen`


def geometric_mean(latencies) -> float:
    """One number to order latencies over several batch sizes by: each batch size counts alike."""
    values = [max(v, 1e-9) for v in latencies]
    return math.exp(sum(map(math.log, values)) / len(values))


def speed(e: Entry) -> float:
    """The bound latency's geometric mean over the batch sizes."""
    return geometric_mean(e.latency.values())


def _same_network(a: Entry, b: Entry) -> bool:
    return a.network is not None and a.network == b.network


def pick(pool: list[Entry], within: list[Entry], z: Callable[[str, str], float | None]) -> Pick:
    """`pool`: the fitting candidates no other dominates; `within`: every fitting candidate (a merge is a member's
    network, so a member within noise of it may be "dominated" by its accuracy alone); `z(a, b)`: the paired z of
    key `a` over key `b` on validation, None where unknown."""
    def tie(a: Entry, b: Entry) -> bool:
        value = 0.0 if a.key == b.key else z(a.key, b.key)
        return value is not None and value < NOISE_Z

    best = max(pool, key=lambda e: (e.accuracy, -speed(e)))
    faster = [e for e in pool if e is not best and not _same_network(e, best) and tie(best, e)
              and all(e.latency[b] <= FASTER * best.latency[b] for b in best.latency)]
    chosen = min(faster, key=speed) if faster else best
    if chosen.kind not in TIE_YIELDS:
        return Pick(best, chosen, bool(faster), None)
    plain = [e for e in within if e.kind in PLAIN and tie(chosen, e) and tie(best, e)
             and all(FASTER * e.latency[b] <= chosen.latency[b] for b in chosen.latency)]
    if not plain:
        return Pick(best, chosen, bool(faster), None)
    return Pick(best, max(plain, key=lambda e: (e.accuracy, -speed(e))), bool(faster), chosen)
