"""Fused points an export need not build: those whose MACs exceed the target's MACs budget in every graph form. A
point's MACs are fixed by its widths before any repair (a repair changes weights, never shapes, and of its forms
the one fusion builds has the fewest MACs: run/forms.py only adds zeros), so the point is fused once without
repair, counted, and left out when even that is over the budget: the chooser could never ship it, and it could
change what ships only by dominating a point within the budget (docs/how-it-works.md). Leaving such points out
saves their repair, form timing and measurement: 132 s of fused points became 25 s in the default export on 2
cores. Only where the host's chooser decides with that budget: a TensorRT device chooses from the frontier by its
own latency, so every point is built for it. The report lists what was left out and why; `--all-points` builds
everything, for the whole front."""
from __future__ import annotations

from dataclasses import dataclass

from ..measure.metrics import macs
from ..targets import Target
from .candidate import Point
from .choose import MEASURED_HERE
from .forms import budget_macs
from .points import fused_point
from .setup import Setup


@dataclass(frozen=True)
class Pruned:
    """A point left unbuilt: its MACs for one sample and the budget it exceeds."""
    point: Point
    macs: int
    cap: float

    def as_dict(self, ensemble_macs: int) -> dict:
        return {"key": self.point.key, "label": self.point.label, "macs": self.macs,
                "macs_ratio": round(self.macs / ensemble_macs, 4),
                "why": f"{self.macs / ensemble_macs:.2f}× the ensemble's MACs in its cheapest form, over the MACs "
                       f"budget ({self.cap / ensemble_macs:.2f}×): it could not ship"}


def point_macs(p: Point, s: Setup, target: Target) -> int:
    """The point's MACs for one sample as fusion lays it out (before repair), in the form the run would build."""
    return macs(fused_point(p, s.aligned[p.method], s.spec, s.splits, target, repair=False), s.splits.example[:1])


def over_budget(points: list[Point], s: Setup, target: Target) -> tuple[list[Point], list[Pruned]]:
    """The points to build, and those left out for exceeding the target's MACs budget (none on a target whose
    device chooses)."""
    if target.runtime not in MEASURED_HERE:
        return points, []
    cap = budget_macs(target, s.models, s.splits.example)
    kept, pruned = [], []
    for p in points:
        m = point_macs(p, s, target)
        if m > cap:
            pruned.append(Pruned(p, m, cap))
        else:
            kept.append(p)
    return kept, pruned
