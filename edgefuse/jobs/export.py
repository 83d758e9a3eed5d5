"""The main job (`make export`): models → spec → align → every candidate measured → one choice on validation
data → model.onnx, report.json/.md and pareto.png for one target, published at once."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from ..run.candidate import Point
from ..run.choose import Choice, choose, dominance
from ..run.config import RunConfig, run_config
from ..run.field import Field, FieldPlan, RunPlan, fusable, grid, measure_field, plan_run, report_head
from ..base.errors import EdgefuseError
from ..graph.onnx import export_onnx, onnx_nodes, parity, parity_inputs
from ..base.files import atomic_write_text, exclusive, replaceable, room, staged, writable
from ..fuse import fuse
from ..models.batchnorm import batchnorms
from ..measure.cuda import require_cuda
from ..measure.metrics import scores
from ..run.prune import Pruned, over_budget
from ..run.setup import prepare
from ..run.report import build_report, write_report
from ..measure.cascade import write_cascade
from ..measure.runners import TorchRunner, predict

OUTPUTS = ("model.onnx", "report.json", "report.md", "pareto.png", "uncertainty.json", "candidates", "cascade",
           "bundle")  # what an export writes: an earlier export's that this one does not write goes


def run_export(config: RunConfig | str | None = None, console: Console | None = None, **overrides) -> dict:
    """Write out_root/<target>/{model.onnx, report.json, report.md, pareto.png, candidates/} and return the report.
    `config` is a RunConfig (or a target name), `overrides` replace its fields. Everything is written to a staging
    folder first, so a failure midway leaves an earlier export as it was."""
    run = run_config(config, overrides)
    console = console or Console(stderr=True)
    plan = plan_run(run)
    tgt = plan.target
    if tgt.runtime == "cuda":  # every candidate is timed on this machine's GPU: fail before any work without one
        console.print(f"[bold]{tgt.name}[/]: candidates timed on {require_cuda()} (torch, CUDA graphs, {tgt.precision})")
    if len(run.methods) != 1:
        raise EdgefuseError(f"an export aligns with one method, got {len(run.methods)}: {', '.join(run.methods)}")
    out_root = Path(run.out_root)
    out_dir = out_root / tgt.name
    _claim(out_dir, run)
    writable(out_root)
    replaceable(out_dir, OUTPUTS)
    # Staged beside where the files end up (a symlinked OUT_ROOT/TARGET may lie on another filesystem), so that
    # every final rename is atomic.
    stage_root = out_dir.resolve().parent if out_dir.is_dir() else out_root
    with exclusive(out_root / f".{tgt.name}.lock", str(out_dir)):
        for stale in {*out_root.glob(f".{tgt.name}-staging-*"), *stage_root.glob(f".{tgt.name}-staging-*")}:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run: we hold the lock
        with staged(out_dir, OUTPUTS, stage_root, f".{tgt.name}-staging-") as stage:
            report = _run(plan, run, stage, console)
    return report


def _claim(out_dir: Path, run: RunConfig) -> None:
    """Whether this export may publish into `out_dir`, decided before any work: never inside the data it reads (nor
    around it); an earlier edgefuse export (recognised by its report) only with --force; a folder holding anything
    else only with --force, and even then only the names an export writes are replaced."""
    data = Path(run.data) if isinstance(run.data, str) and Path(run.data).exists() else None
    if data is not None:
        src, dst = data.resolve(), out_dir.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise EdgefuseError(f"the export would write {out_dir}, which overlaps the data it reads ({run.data}): "
                                "choose an --out-root outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgefuseError(f"cannot write the export to {out_dir}: it is a file")
    entries = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) if out_dir.is_dir() else []
    if run.force or entries in ([], ["sweep"]):
        return
    if _earlier_export(out_dir):
        raise EdgefuseError(f"{out_dir} holds an earlier export (use --force to replace it)")
    raise EdgefuseError(f"{out_dir} holds files that are not an edgefuse export ({', '.join(entries[:3])}"
                        f"{', ...' if len(entries) > 3 else ''}): choose another --out-root, or use --force to "
                        f"replace there only what an export writes ({', '.join(OUTPUTS)})")


def _earlier_export(folder: Path) -> bool:
    """An edgefuse export: its report.json reads as one (a target, the shipped row, the candidates)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(report, dict) and {"target", "shipped", "candidates"} <= set(report)


def _run(plan: RunPlan, run: RunConfig, out_dir: Path, console: Console) -> dict:
    method, depth = run.methods[0], run.depth
    budget, cfg = plan.budget, plan.distill
    s = prepare(run, console)
    tgt, alphas = fusable(s, plan.target, run.alphas, console)
    if depth is not None and not 0 <= depth <= len(s.spec.cut_points):
        raise EdgefuseError(f"depth must be between 0 and {len(s.spec.cut_points)} for this model, got {depth}")
    if cfg is not None:
        console.print(f"[bold]distillation budget[/]: {cfg.describe()} per distilled candidate (distill_steps in "
                      f"{tgt.source}); about {cfg.steps * cfg.batch_size / len(s.splits.x_train):.1f} passes over the "
                      "unlabeled training images")
    pruned: list[Pruned] = []
    if depth is None:
        points = grid(len(s.spec.cut_points), alphas, (method,), run.repairs)
        if not run.all_points:
            points, pruned = over_budget(points, s, tgt)
    else:  # that depth alone, and its distilled form when the target distils
        points = [Point("depth", float(depth), method, run.repairs[0], d) for d in (False, True)
                  if depth and (cfg or not d)]
    if pruned:
        console.print(f"[bold]not built[/]: {', '.join(p.point.label for p in pruned)} — over the MACs budget "
                      f"({tgt.max_macs_ratio:g}× the ensemble's) in every graph form, so none could ship "
                      "(--all-points builds them)")
    room(out_dir, _bytes_needed(s.models, len(points)), f"this export of {len(points)} fused points")
    f = measure_field(s, tgt, points, budget, console,
                      FieldPlan(out_dir / "candidates", cfg, run.cache, workers=0, pick=depth is None))
    t = time.perf_counter()
    # On a TensorRT target the bundle's root graph is one module's (its FP16 and INT8 forms are derived from it): a
    # cascade goes to the device as two stage engines, and deploy.py --choose weighs it there.
    rows = [c for c in f.rows if c.kind != "cascade"] if tgt.runtime == "tensorrt" else f.rows
    choice = _forced(f, depth) if depth is not None else choose(rows, budget, f.exact["ensemble"])
    console.print(f"[bold]ship[/]: {choice.chosen.label} — {choice.reason}")
    head = report_head(tgt, s, (method,), budget, cfg, f)
    report = build_report(head, f.members, f.exact, f.others, choice, out_dir)
    report["pruned"] = [p.as_dict(f.exact["ensemble"].macs) for p in pruned]
    chosen, module = choice.chosen, f.modules[choice.chosen.key]
    report["parity"] = {"max_abs_diff": parity(chosen.file, module, parity_inputs(s.splits.example)),
                        "batch_sizes": [1, 3]}
    naive = fuse(s.models, s.spec, depth=len(s.spec.cut_points), data=s.splits.calib_batches,
                 repair="bn" if batchnorms(s.models[0]) else None)  # the plain average, BN reset where there is any
    report["naive_merge"] = scores(predict(TorchRunner(naive, torch.get_num_threads()), s.splits.x_test), s.splits.y_test)
    if chosen.depth and tgt.batch_heads:
        unbatched = fuse(s.aligned[method], s.spec, depth=chosen.depth, data=s.splits.calib_batches,
                         repair=None)  # read for its node count only, which no repair changes
        report["fused"]["onnx_nodes_unbatched"] = onnx_nodes(
            export_onnx(unbatched, s.splits.example, out_dir / "candidates" / "chosen_unbatched.onnx", tgt.opset))
    if tgt.runtime == "tensorrt":
        from ..device.frontier import device_candidates
        from ..device.stage import prepare_device

        summary = f"{len(s.models)} × {s.label}, {chosen.label}, test accuracy {chosen.test['accuracy']:.4f}"
        fp32 = Path(chosen.file) if chosen.precision == "fp32" else export_onnx(  # an INT8 choice: its FP32 graph
            module, s.splits.example, out_dir / "candidates" / "model_fp32.onnx", tgt.opset)
        sent = tuple(device_candidates(f.rows, f.modules, tgt, s.splits.example, out_dir, chosen, console))
        console.print(f"[bold]device candidates[/]: {', '.join(c.row.label for c in sent)} — the device times them "
                      "and decides (python3 deploy.py --choose in the bundle)")
        report |= prepare_device(tgt, module, fp32, s.splits, out_dir, summary, console, sent)
    if chosen.kind == "cascade":
        report["shipped"]["cascade"] = write_cascade(chosen, out_dir / "cascade")
        if chosen.cascade["shifted"]:
            esc = chosen.cascade["escalated"]
            console.print(f"[yellow]warning[/]: the shipped cascade escalates {esc['test']:.1%} of the test inputs "
                          f"against {esc['validation']:.1%} of validation's: the inputs have shifted, and its cost "
                          "and accuracy with them")
    report["seconds"] = _summed(report["seconds"] | {"report and parity": time.perf_counter() - t})
    console.print("[bold]time[/]: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    write_report(report, out_dir)
    for folder in (out_dir, out_dir / "bundle"):
        if chosen.uncertainty and folder.is_dir():  # the device flags inputs with the shipped model's rule
            atomic_write_text(folder / "uncertainty.json", json.dumps(chosen.uncertainty, indent=2) + "\n")
    shutil.copyfile(chosen.file, out_dir / "model.onnx")  # out_dir is the staging folder: publish() is atomic
    return report


def _summed(seconds: dict[str, float]) -> dict[str, float]:
    """Each phase's seconds, rounded, and their total."""
    return {k: round(v, 2) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 2)}


def _bytes_needed(models: list, points: int) -> int:
    """About what an export writes: each member's graph, and for every ensemble, sub-ensemble, cascade and fused
    point one graph of at most the N members' weights (a TensorRT bundle copies a few of them again)."""
    n = len(models)
    member = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
    graphs = 2 + (n - 1) + points + 4 * n + 4
    return member * (n + n * graphs) + 16_000_000


def _forced(f: Field, depth: int) -> Choice:
    """--depth overrides the chooser: the batched ensemble for 0, else that depth (distilled when it was). The
    report still says what dominates it."""
    chosen = f.exact.get("ensemble_batched", f.exact["ensemble"]) if depth == 0 else \
        [c for c in f.others if c.depth == depth][-1]
    beaten = dominance(f.rows, list(chosen.latency_by_batch))
    reason = f"asked for with --depth {depth}"
    if chosen.key in beaten:
        reason += f"; {next(c.label for c in f.rows if c.key == beaten[chosen.key])} is as accurate and no slower"
    return Choice(chosen, reason, beaten, (chosen.key,))
