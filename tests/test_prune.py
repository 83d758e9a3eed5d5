"""Points over the MACs budget are left unbuilt: their MACs are predicted exactly before any repair, and leaving
them out changes neither the rows that remain nor the model that ships."""
from dataclasses import replace

import pytest
from rich.console import Console

from edgefuse.run.choose import choose
from edgefuse.run.config import RunConfig
from edgefuse.run.field import FieldPlan, grid, measure_field, plan_run
from edgefuse.run.prune import over_budget
from edgefuse.run.setup import prepare
from edgefuse.targets import load_target


@pytest.fixture(scope="module")
def full_field(cnns, tmp_path_factory):
    """Every depth and α of the digits CNNs built and measured, as --all-points does, with what pruning predicts."""
    root = tmp_path_factory.mktemp("prune")
    run = RunConfig(models=tuple(cnns[:3]), data="digits", out_root=str(root), cache=str(root / "cache"),
                    distill_steps=0, all_points=True)
    plan, console = plan_run(run), Console(quiet=True)
    s = prepare(run, console)
    points = grid(len(s.spec.cut_points), (0.1, 0.5), run.methods, run.repairs)
    kept, pruned = over_budget(points, s, plan.target)
    f = measure_field(s, plan.target, points, plan.budget, console, FieldPlan(root / "candidates", pick=False))
    return plan, f, kept, pruned, s


def test_pruned_points_are_exactly_those_over_the_budget(full_field):
    plan, f, kept, pruned, _ = full_field
    cap = plan.target.max_macs_ratio * f.exact["ensemble"].macs
    rows = {c.key: c for c in f.others if c.kind == "fused"}
    assert pruned and kept, "the digits CNNs have points on both sides of the budget"
    for p in pruned:  # its cheapest form is over the cap, and the form the run built is no cheaper
        assert p.macs > cap and rows[p.point.key].macs >= p.macs
        assert p.as_dict(f.exact["ensemble"].macs)["macs_ratio"] > plan.target.max_macs_ratio
    for p in kept:  # built as predicted, in a form within the budget
        assert rows[p.key].macs <= cap
    assert {p.key for p in kept} | {p.point.key for p in pruned} == set(rows)


def test_pruning_changes_no_choice(full_field):
    """The same rows without the pruned ones ship the same model for the same reason, under the target's MACs budget
    and a tighter one (which leaves the pruned points out too)."""
    plan, f, _, pruned, _ = full_field
    gone = {p.point.key for p in pruned}
    rest = [c for c in f.rows if c.key not in gone]
    assert len(rest) < len(f.rows)
    for budget in (plan.budget, replace(plan.budget, max_macs_ratio=0.4)):
        full, kept = choose(f.rows, budget, f.exact["ensemble"]), choose(rest, budget, f.exact["ensemble"])
        assert kept.chosen.key == full.chosen.key and kept.reason == full.reason


def test_targets_whose_device_chooses_build_every_point(full_field):
    _, _, kept, pruned, s = full_field
    points = [*kept, *(p.point for p in pruned)]
    assert over_budget(points, s, load_target("jetson-orin-nano-jp6")) == (points, [])
