"""Every candidate of one run, measured alike: the members, the exact ensembles, the sub-ensembles, the merges (for
fine-tunes of one network), the cascades, the fused points, and then the distilled ones — the best member and the
best fused depth and alpha within the budget, each distilled with the same budget towards the ensemble (full or sub)
most accurate on validation."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from torch import nn

from .baselines import choose_combine, exact_ensembles, int8_ensembles, member_logits, sub_ensembles
from .cascade import cascades
from .merges import merge_rows
from .candidate import Candidate, Point
from .points import Job, run_points
from .choose import Budget, fits, target_budget
from .config import RunConfig
from ..fuse import DistillConfig
from .setup import Setup
from ..base.errors import warn_once
from ..targets import Target, load_target
from ..base.combine import DEFAULT_COMBINE


def grid(n_cuts: int, alphas: tuple[float, ...], methods: tuple[str, ...], repairs: tuple) -> list[Point]:
    """Every depth from 1 to the full merge and every alpha, for each alignment method and repair."""
    return [Point(kind, float(v), m, r) for m in methods for r in repairs
            for kind, values in (("depth", range(1, n_cuts + 1)), ("alpha", alphas)) for v in values]


def fusable(s: Setup, tgt: Target, alphas: tuple[float, ...], console: Console) -> tuple[Target, tuple[float, ...]]:
    """The target and the alphas these members allow: an alpha model's units live in one network of grouped kernels
    (attention has none yet: no alpha points), and without any batched form a fused model's heads run one after
    another."""
    if s.alpha_refusal is not None:
        console.print(f"[bold]no alpha points[/]: {s.alpha_refusal} (alpha fusion needs grouped kernels)")
        alphas = ()
    if s.batch_refusal is not None:
        console.print(f"[bold]no batched form[/]: {s.batch_refusal} — heads run one after another")
        tgt = replace(tgt, batch_heads=False)
    return tgt, alphas


@dataclass
class Field:
    """The measured candidates and, when kept, their modules by key (the shipped one is parity-checked)."""
    members: list[Candidate]
    exact: dict[str, Candidate]
    others: list[Candidate]
    modules: dict[str, nn.Module] = field(default_factory=dict)
    teacher: Candidate | None = None  # the ensemble (full or sub) that distillation trains towards
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock seconds per phase of measuring them

    def timed(self, phase: str, since: float) -> float:
        """Add the seconds since `since` to `phase`; the time now, for the next phase."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now

    @property
    def rows(self) -> list[Candidate]:
        return self.members + list(self.exact.values()) + self.others


@dataclass(frozen=True)
class FieldPlan:
    """How the candidates of one run are measured: where their files go, the distillation budget, where distilled
    weights are cached, where points run (`workers` processes, or Ray), where finished points are stored (`store`,
    under the fingerprint `key`, for a resumable sweep), and whether the distilled candidates are picked (`pick`)."""
    out_dir: Path
    distill: DistillConfig | None = None
    cache: str | Path | None = None
    workers: int = 0
    ray_address: str | None = None
    store: Path | None = None
    key: str = ""
    pick: bool = True


def effective_target(run: RunConfig) -> Target:
    """The run's target file, with the distillation budget and the latency and memory budgets the run overrides
    (for a TensorRT target those go to the device, which applies them)."""
    tgt = load_target(run.target)
    lat = tuple(run.latency_ms) if isinstance(run.latency_ms, (list, tuple)) else run.latency_ms
    changes = {k: v for k, v in (("distill_steps", run.distill_steps), ("memory_budget_mb", run.memory_mb),
                                 ("latency_budget_ms", lat)) if v is not None}
    if run.augment is not None and not changes.get("distill_steps", tgt.distill_steps):
        warn_once("--augment/--no-augment shapes distillation images, and this run distils nothing (distill_steps "
                  "is 0): it changes nothing")
    return replace(tgt, **changes)


@dataclass(frozen=True)
class RunPlan:
    """A run's target resolved once: the target file with the run's overrides, the budget the chooser applies and
    the distillation every distilled candidate gets."""
    target: Target
    budget: Budget
    distill: DistillConfig | None


def plan_run(run: RunConfig) -> RunPlan:
    tgt = effective_target(run)
    return RunPlan(tgt, target_budget(tgt, run.latency_ms, run.memory_mb, run.max_drop, run.min_auroc),
                   distill_config(tgt, run.augment))


def distill_config(tgt: Target, augment: bool | None = None) -> DistillConfig | None:
    """The target's distillation budget (`distill_steps`, `distill_batch_size`, `distill_augment`,
    `distill_per_head`); None without."""
    if not tgt.distill_steps:
        return None
    return DistillConfig(steps=tgt.distill_steps, batch_size=tgt.distill_batch_size,
                         augment=tgt.distill_augment if augment is None else augment, per_head=tgt.distill_per_head)


def measure_field(s: Setup, tgt: Target, points: list[Point], budget: Budget, console: Console,
                  plan: FieldPlan) -> Field:
    """Members, then the exact ensembles (their N-sessions form runs the members' files), then `points`, then (with
    `pick`) the distilled candidates picked on validation accuracy. Everything lands in `plan.out_dir`."""
    out_dir, distill, cache, workers = plan.out_dir, plan.distill, plan.cache, plan.workers
    method = points[0].method if points else next(iter(s.aligned))
    keep = workers == 0 and plan.ray_address is None and plan.store is None

    def jobs(pts: list[Point]) -> list[Job]:
        teacher = out.teacher.members if out.teacher is not None else None
        how = (out.teacher.combine or DEFAULT_COMBINE) if out.teacher is not None else DEFAULT_COMBINE
        return [Job(point=p, aligned=s.aligned[p.method], splits=s.splits, target=tgt, out_dir=str(out_dir),
                    ensemble_predictions=s.ensemble_predictions, distill=distill,
                    cache=str(cache) if cache else None, keep_module=keep, teacher=teacher, teacher_combine=how,
                    spec=s.spec, built=out.modules.get(replace(p, distill=False).key) if p.distill else None)
                for p in pts]

    def int8(pts: list[Point]) -> list[Point]:
        """Every point again as an INT8 graph, when the target weighs INT8."""
        return [p.as_int8() for p in pts] if tgt.int8 else []

    def run(pts: list[Point], what: str, w: int = workers) -> list[Candidate]:
        with Progress(console=console, disable=console.quiet or not pts) as progress:
            task = progress.add_task(f"{what}: {len(pts)} candidates", total=len(pts))
            done = run_points(jobs(pts), w, plan.ray_address if w else None, plan.store, plan.key,
                              (progress, task))
        out.modules |= {c.key: m for c, m in done if m is not None}
        return [c for c, _ in done]

    out = Field([], {}, [])
    t = time.perf_counter()
    members = [Point("member", i, method, None) for i in range(len(s.models))]
    out.members = run(members, "members", 0)
    t = out.timed("members", t)
    kept = Path(cache) if cache else None  # graphs an earlier run exported, and their outputs, reused
    val_logits = member_logits([m.file for m in out.members], s.splits, "validation", kept)
    exact, modules = exact_ensembles(s.aligned[method], [m.file for m in out.members], s.splits, tgt, out_dir,
                                     choose_combine(val_logits, s.splits.y_val.numpy()), kept)
    out.exact, out.modules = exact, out.modules | modules
    t = out.timed("ensembles", t)
    subs, sub_modules = sub_ensembles(s.aligned[method], s.splits, tgt, out_dir, s.ensemble_predictions, val_logits,
                                      kept)
    out.others += subs
    out.modules |= sub_modules
    t = out.timed("sub-ensembles", t)
    if s.regime.name == "fine-tunes":  # merges of one network's fine-tunes cost one member; of others, nothing works
        rows, merge_modules = merge_rows(s.aligned[method], s.base, s.splits, tgt, out_dir, s.ensemble_predictions)
        out.others += rows
        out.modules |= merge_modules
        console.print(f"[bold]merges[/]: {', '.join(f'{r.label} (validation {r.accuracy:.4f})' for r in rows)}")
        t = out.timed("merges", t)
    if tgt.runtime != "cuda":  # timed here on onnxruntime (for TensorRT, as every row, a proxy: the device times it)
        subsets = [c.members for c in subs if c.precision == "fp32"]
        rows, refs = cascades(out.members, s.aligned[method], subsets, s.splits, tgt, out_dir,
                              s.ensemble_predictions, kept)
        out.others += rows
        out.modules |= refs
        console.print(f"[bold]cascades[/]: {len(rows)}, from member {rows[0].cascade['first']} "
                      f"({rows[0].cascade['gate'].replace('_', ' ')} gate)" if rows else "[bold]cascades[/]: none")
        t = out.timed("cascades", t)
    if tgt.int8:
        out.others += int8_ensembles(modules, s.splits, tgt, out_dir, s.ensemble_predictions)
        t = out.timed("ensembles", t)
    out.others += run(points + int8(members + points), "fuse, export, measure")
    t = out.timed("fused points", t)
    if distill is not None and plan.pick:
        out.teacher = teacher_of(out, distill)
        console.print(f"[bold]teacher[/]: {out.teacher.label} (validation {out.teacher.accuracy:.4f})")
        picks = distill_picks(out, budget)
        console.print(f"[bold]distill[/]: {', '.join(p.label for p in picks)}; {distill.describe()} each")
        out.others += run(picks + int8(picks), "distill, export, measure")
        out.timed("distilled", t)
    return out


def teacher_of(f: Field, distill: DistillConfig) -> Candidate:
    """The ensemble most accurate on validation, full or sub (the whole ensemble on a tie): where one member is
    poor, a subset teaches better. Per-head distillation needs a head per member, so it keeps the whole ensemble."""
    subs = [] if distill.per_head else [c for c in f.others if c.kind == "sub-ensemble" and c.precision == "fp32"]
    return max([f.exact["ensemble"], *subs], key=lambda c: c.accuracy)


def distill_picks(f: Field, budget: Budget) -> list[Point]:
    """The points worth the distillation budget, chosen on validation only: the most accurate member, and per
    fused family (depth, alpha) its most accurate point within the budget (or, when none fits, the most accurate of
    its cheapest: the repairs of one point cost the same)."""
    best = max(f.members, key=lambda c: c.accuracy)
    picks = [Point("member", best.point.value, best.point.method, None, True)]
    ens_macs = f.exact["ensemble"].macs
    for kind in ("depth", "alpha"):
        family = [c for c in f.others if c.point and c.point.kind == kind and not c.point.distill
                  and c.precision == "fp32"]
        if not family:
            continue
        within = [c for c in family if fits(c, budget, ens_macs)]
        pick = max(within, key=lambda c: c.accuracy) if within else min(family, key=lambda c: (c.macs, -c.accuracy))
        p = pick.point
        picks.append(Point(p.kind, p.value, p.method, p.repair, True))
    return picks


DISTILL_WHY = "the same budget for every distilled candidate, sized to keep make export under 5 minutes on 2 cores"


def report_head(tgt: Target, s: Setup, methods: tuple[str, ...], budget: Budget, cfg: DistillConfig | None,
                f: Field) -> dict:
    """What a report says about its run before the rows: target, models, data splits, alignment, budget, which
    ensemble taught the distilled candidates, and the seconds each phase took so far."""
    teacher = f.teacher
    return {"seconds": s.seconds | f.seconds, **head(tgt, s.label, len(s.models), s.data_lines(), budget),
            "batched_heads": tgt.batch_heads, "max_depth": len(s.spec.cut_points), "regime": s.regime.as_dict(),
            "align_method": ", ".join(methods),
            "align_seconds": s.align_seconds[methods[0]] if len(methods) == 1 else s.align_seconds,
            "distillation": {"config": cfg.describe(), "steps": cfg.steps, "batch_size": cfg.batch_size,
                             "augment": cfg.augment, "why": DISTILL_WHY,
                             "teacher": teacher.label if teacher else None} if cfg else None}


def head(tgt: Target, arch: str, n_models: int, data: dict, budget: Budget) -> dict:
    """What every report (an export's, a sweep's, `ef.verify`'s) says first: the target and how it times, the
    models, what data was used for what, and the budget."""
    return {"target": tgt.name, "arch": arch, "n_models": n_models, **data, "threads": tgt.threads,
            "batch_sizes": list(tgt.batch_sizes), "budget": budget.as_dict()}
