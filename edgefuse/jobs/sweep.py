"""The sweep: depths, alphas, alignment methods and repairs as independent candidates next to the members and the
exact ensembles, measured in worker processes or on a Ray cluster, resumable, then the one chooser within a budget."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console
from torch import nn

from ..run.points import fingerprint
from ..run.choose import choose, target_budget
from ..run.field import DEFAULT_ALPHAS, distill_config, grid, measure_field, report_head
from ..base.errors import EdgefuseError
from ..base.files import writable
from ..run.setup import prepare
from ..run.report import build_report, write_report
from ..models.data import Splits
from ..targets import load_target


def run_sweep(target: str = "cpu-ort", models: list[nn.Module] | None = None, arch: str = "cnn", n: int = 4,
              dataset: str | Splits = "fashion-mnist", out_root: str | Path = "build", cache: str | Path = "build/cache",
              methods: tuple[str, ...] = ("weight",), alphas: tuple[float, ...] = DEFAULT_ALPHAS,
              repairs: tuple = ("bn",), latency_ms: float | tuple[float, ...] | None = None,
              memory_mb: float | None = None, max_drop: float | None = None, workers: int = 1, ray_address: str | None = None,
              distill_steps: int | None = None, augment: bool | None = None, console: Console | None = None,
              min_auroc: float | None = None) -> dict:
    """Measure the grid and choose within the budget (the target's, overridden where given); writes
    out_root/<target>/sweep/{sweep.json, sweep.md, pareto.png, points/, candidates/}. Re-running resumes."""
    console = console or Console(stderr=True)
    tgt = load_target(target)
    if tgt.runtime == "cuda":
        raise EdgefuseError(f"target '{tgt.name}' is measured by make gpu-check, not by a sweep")
    if distill_steps is not None:
        tgt = replace(tgt, distill_steps=distill_steps)
    budget = target_budget(tgt, latency_ms, memory_mb, max_drop, min_auroc)
    out = Path(out_root) / tgt.name / "sweep"
    writable(out / "points")
    s = prepare(models, arch, n, dataset, cache, tuple(methods), console)
    cfg = distill_config(tgt, augment)
    key = fingerprint(s.models, Path(tgt.source).read_text(), s.splits.digest(), repr(cfg))
    points = grid(len(s.spec.cut_points), alphas, methods, repairs)
    f = measure_field(s, tgt, points, out / "candidates", budget, console, cfg, cache, workers, ray_address,
                      out / "points", key)
    choice = choose(f.rows, budget, f.exact["ensemble"])
    head = report_head(tgt, s, tuple(methods), budget, cfg, f.teacher)
    sweep = build_report(head, f.members, f.exact, f.others, choice, out)
    write_report(sweep, out, name="sweep")
    return sweep
