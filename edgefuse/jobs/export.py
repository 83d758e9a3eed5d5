"""The main job (`make export`): models → spec → align → every candidate measured → one choice on validation
data → model.onnx, report.json/.md and pareto.png for one target, published at once."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from torch import nn

from ..run.candidate import Point
from ..run.choose import Choice, choose, dominance, target_budget
from ..run.field import DEFAULT_ALPHAS, Field, distill_config, grid, measure_field, report_head
from ..base.errors import EdgefuseError
from ..graph.onnx import export_onnx, onnx_nodes, parity, parity_inputs
from ..base.files import atomic_write_text, exclusive, publish, writable
from ..fuse import fuse
from .gpucheck import run_gpu_check
from ..measure.metrics import scores
from ..run.setup import prepare
from ..run.report import build_report, write_report
from ..measure.runners import TorchRunner, predict
from ..models.data import Splits
from ..targets import Target, load_target

def run_export(target: str = "cpu-ort", models: list[nn.Module] | None = None, arch: str = "cnn", n: int = 4,
               dataset: str | Splits = "fashion-mnist", out_root: str | Path = "build", cache: str | Path = "build/cache",
               method: str = "weight", depth: int | None = None, console: Console | None = None,
               force: bool = False, augment: bool | None = None) -> dict:
    """Write out_root/<target>/{model.onnx, report.json, report.md, pareto.png, candidates/} and return the report.
    Everything is written to a staging folder first, so a failure midway leaves an earlier export as it was."""
    console = console or Console(stderr=True)
    tgt = load_target(target)
    if tgt.runtime == "cuda":
        if models is not None:
            raise EdgefuseError(f"target '{tgt.name}' measures the zoo's cached models; pass no checkpoints")
        return run_gpu_check(tgt, arch, n, cache, out_root, console=console)
    out_dir = Path(out_root) / tgt.name
    if (out_dir / "model.onnx").exists() and not force:
        raise EdgefuseError(f"{out_dir} holds an earlier export (use --force to replace it)")
    writable(Path(out_root))
    with exclusive(Path(out_root) / f".{tgt.name}.lock", str(out_dir)):
        for stale in Path(out_root).glob(f".{tgt.name}-staging-*"):  # left by a killed run: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{tgt.name}-staging-"))
        try:
            report = _run(tgt, models, arch, n, dataset, stage, cache, method, depth, console, augment)
            publish(stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return report


def _run(tgt: Target, models: list[nn.Module] | None, arch: str, n: int, dataset: str, out_dir: Path,
         cache: str | Path, method: str, depth: int | None, console: Console, augment: bool | None) -> dict:
    s = prepare(models, arch, n, dataset, cache, (method,), console)
    if depth is not None and not 0 <= depth <= len(s.spec.cut_points):
        raise EdgefuseError(f"depth must be between 0 and {len(s.spec.cut_points)} for this model, got {depth}")
    budget = target_budget(tgt)
    cfg = distill_config(tgt, augment)
    if cfg is not None:
        console.print(f"[bold]distillation budget[/]: {cfg.describe()} per distilled candidate (distill_steps in "
                      f"{tgt.source}); about {cfg.steps * cfg.batch_size / len(s.splits.x_train):.1f} passes over the "
                      "unlabeled training images")
    if depth is None:
        points = grid(len(s.spec.cut_points), DEFAULT_ALPHAS, (method,))
    else:  # that depth alone, and its distilled form when the target distils
        points = [Point("depth", float(depth), method, "bn", d) for d in (False, True) if depth and (cfg or not d)]
    f = measure_field(s, tgt, points, out_dir / "candidates", budget, console, cfg, cache, pick=depth is None)
    choice = _forced(f, depth) if depth is not None else choose(f.rows, budget, f.exact["ensemble"])
    console.print(f"[bold]ship[/]: {choice.chosen.label} — {choice.reason}")
    head = report_head(tgt, s, (method,), budget, cfg, f.teacher)
    report = build_report(head, f.members, f.exact, f.others, choice, out_dir)
    chosen, module = choice.chosen, f.modules[choice.chosen.key]
    report["parity"] = {"max_abs_diff": parity(chosen.file, module, parity_inputs(s.splits.example)),
                        "batch_sizes": [1, 3]}
    naive = fuse(s.models, s.spec, depth=len(s.spec.cut_points), data=s.splits.calib_batches)
    report["naive_merge"] = scores(predict(TorchRunner(naive), s.splits.x_test), s.splits.y_test)
    if chosen.depth and tgt.batch_heads:
        unbatched = fuse(s.aligned[method], s.spec, depth=chosen.depth, data=s.splits.calib_batches)
        report["fused"]["onnx_nodes_unbatched"] = onnx_nodes(
            export_onnx(unbatched, s.splits.example, out_dir / "candidates" / "chosen_unbatched.onnx", tgt.opset))
    if tgt.runtime == "tensorrt":
        from ..device import prepare_device

        summary = f"{len(s.models)} × {s.label}, {chosen.label}, test accuracy {chosen.test['accuracy']:.4f}"
        fp32 = Path(chosen.file) if chosen.precision == "fp32" else export_onnx(  # an INT8 choice: its FP32 graph
            module, s.splits.example, out_dir / "candidates" / "model_fp32.onnx", tgt.opset)
        report |= prepare_device(tgt, module, fp32, s.splits.example, s.splits.x_test, s.splits.y_test, out_dir,
                                 summary, console, calibration=s.splits.x_train)
    write_report(report, out_dir)
    for folder in (out_dir, out_dir / "bundle"):
        if chosen.uncertainty and folder.is_dir():  # the device flags inputs with the shipped model's rule
            atomic_write_text(folder / "uncertainty.json", json.dumps(chosen.uncertainty, indent=2) + "\n")
    shutil.copyfile(chosen.file, out_dir / "model.onnx")  # out_dir is the staging folder: publish() is atomic
    return report


def _forced(f: Field, depth: int) -> Choice:
    """--depth overrides the chooser: the batched ensemble for 0, else that depth (distilled when it was). The
    report still says what dominates it."""
    chosen = f.exact["ensemble_batched"] if depth == 0 else [c for c in f.others if c.depth == depth][-1]
    beaten = dominance(f.rows, list(chosen.latency_by_batch))
    reason = f"asked for with --depth {depth}"
    if chosen.key in beaten:
        reason += f"; {next(c.label for c in f.rows if c.key == beaten[chosen.key])} is as accurate and no slower"
    return Choice(chosen, reason, beaten, (chosen.key,))
