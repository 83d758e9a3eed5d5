"""The sweep: depths, alphas, alignment methods and repairs as independent candidates next to the members and the
exact ensembles, measured in worker processes or on a Ray cluster, resumable, then the one chooser within a budget."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..run.kept import fingerprint
from ..run.choose import choose
from ..run.config import RunConfig, run_config
from ..run.field import FieldPlan, RunPlan, fusable, grid, measure_field, plan_run, report_head
from ..base.errors import EdgefuseError
from ..base.files import exclusive, writable
from ..run.setup import prepare
from ..run.report import build_report, write_report


def run_sweep(config: RunConfig | str | None = None, console: Console | None = None, **overrides) -> dict:
    """Measure the grid (every depth and alpha per method and repair of the RunConfig) and choose within the budget
    (the target's, overridden where the config says); writes out_root/<target>/sweep/{sweep.json, sweep.md,
    pareto.png, points/, candidates/}. Re-running resumes."""
    run = run_config(config, overrides)
    console = console or Console(stderr=True)
    plan = plan_run(run)
    tgt = plan.target
    if tgt.runtime == "cuda":
        raise EdgefuseError(f"target '{tgt.name}' is measured on the GPU by an export (make export "
                            f"TARGET={tgt.name}), not by a sweep")
    out = Path(run.out_root) / tgt.name / "sweep"
    writable(out / "points")
    with exclusive(Path(run.out_root) / f".{tgt.name}.lock", str(out.parent)):  # the export's lock: one writer
        return _sweep(run, plan, out, console)


def _sweep(run: RunConfig, plan: RunPlan, out: Path, console: Console) -> dict:
    s = prepare(run, console)
    budget, cfg = plan.budget, plan.distill
    tgt, alphas = fusable(s, plan.target, run.alphas, console)
    key = fingerprint(s.models, Path(tgt.source).read_text(), s.splits.digest, repr(cfg),
                      "unaligned: fine-tunes of a given base" if s.base is not None else "")
    points = grid(len(s.spec.cut_points), alphas, run.methods, run.repairs)
    f = measure_field(s, tgt, points, budget, console, FieldPlan(out / "candidates", cfg, run.cache, run.workers,
                                                                  run.ray_address, out / "points", key))
    choice = choose(f.rows, budget, f.exact["ensemble"])
    head = report_head(tgt, s, run.methods, budget, cfg, f)
    sweep = build_report(head, f.members, f.exact, f.others, choice, out)
    write_report(sweep, out, name="sweep")
    return sweep
