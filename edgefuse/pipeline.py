"""The main job: models → spec → align → fuse at every depth → export → measure → report, for one target."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from . import data as datasets
from .align import align
from .checks import check_models
from .errors import EdgefuseError
from .export import export_onnx, onnx_nodes, parity, parity_inputs
from .files import publish
from .fuse import fuse
from .spec import permutation_spec
from .runtime import SessionsRunner, TorchRunner, predict
from .targets import Target, load_target
from .verify import agreement, best_exact, mean_rows, measure, public, scores, write_report

CALIBRATION_IMAGES = 2000


def load_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration inputs from the training split, test inputs, test labels)."""
    if name == "fashion-mnist":
        x_train, _ = datasets.fashion_mnist("train")
        x_test, y_test = datasets.fashion_mnist("test")
        gen = torch.Generator().manual_seed(0)
        return x_train[torch.randperm(len(x_train), generator=gen)[:CALIBRATION_IMAGES]], x_test, y_test
    if name == "digits":
        x, y = datasets.digits()
        return x[:1000], x[1000:], y[1000:]
    raise EdgefuseError(f"unknown dataset '{name}' (choose from fashion-mnist, digits)")


def choose_depth(candidates: list[dict], ensemble: dict, target: Target, baseline: dict | None = None) -> int:
    """The most accurate fused depth (>= 1) at or under the target's share of the ensemble's MACs and, when the
    target names one, under its latency budget; the cheapest candidate when none fits. A candidate slower than
    the best exact ensemble at any of the target's batch sizes is never chosen (the exact one is more accurate,
    so it dominates): when every candidate is, the answer is depth 0, the ensemble itself."""
    fused = [c for c in candidates if c["depth"] >= 1]
    if baseline:
        fused = [c for c in fused if all(c["latency_by_batch"][b]["p50"] < base["p50"] for b, base in baseline.items())]
        if not fused:
            return 0
    budget = target.latency_budget_ms if target.runtime == "onnxruntime" else None  # device latency is not ours
    fits = [c for c in fused if c["macs"] <= target.max_macs_ratio * ensemble["macs"]
            and (budget is None or c["latency_ms"]["p50"] <= budget)]
    if not fits:
        return min(fused, key=lambda c: c["macs"])["depth"]
    return max(fits, key=lambda c: (c["accuracy"], -c["macs"]))["depth"]


def run_export(target: str = "cpu-ort", models: list[nn.Module] | None = None, arch: str = "cnn", n: int = 4,
               dataset: str = "fashion-mnist", out_root: str | Path = "build", cache: str | Path = "build/cache",
               method: str = "weight", depth: int | None = None, console: Console | None = None,
               force: bool = False) -> dict:
    """Write build/<target>/{model.onnx, report.json, report.md, pareto.png} and return the report. Everything is
    written to a staging folder first, so a failure midway leaves an earlier export as it was."""
    console = console or Console(stderr=True)
    tgt = load_target(target)
    if tgt.runtime == "cuda":
        if models is not None:
            raise EdgefuseError(f"target '{tgt.name}' measures the zoo's cached models; pass no checkpoints")
        from .gpucheck import run_gpu_check
        return run_gpu_check(tgt, arch, n, cache, out_root, console=console)
    out_dir = Path(out_root) / tgt.name
    if (out_dir / "model.onnx").exists() and not force:
        raise EdgefuseError(f"{out_dir} holds an earlier export (use --force to replace it)")
    Path(out_root).mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{tgt.name}-staging-"))
    try:
        report = _run(tgt, models, arch, n, dataset, stage, cache, method, depth, console)
        publish(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _run(tgt: Target, models: list[nn.Module] | None, arch: str, n: int, dataset: str, out_dir: Path,
         cache: str | Path, method: str, depth: int | None, console: Console) -> dict:
    label = arch if models is None else type(models[0]).__name__
    if models is None:
        from .zoo import zoo_models
        console.print(f"[bold]zoo[/]: {n} × {arch} on Fashion-MNIST (cached under {cache})")
        models, _ = zoo_models(arch, n, cache=cache, quiet=console.quiet)
    check_models(models, "export")
    calib, x_test, y_test = load_dataset(dataset)
    example = x_test[:2]
    spec = permutation_spec(models[0], example)
    if depth is not None and not 0 <= depth <= len(spec.cut_points):
        raise EdgefuseError(f"depth must be between 0 and {len(spec.cut_points)} for this model, got {depth}")
    calib_batches = datasets.batches(calib, batch_size=200)
    t0 = time.perf_counter()
    aligned = align(models, spec, method=method, data=calib_batches)
    align_s = time.perf_counter() - t0
    console.print(f"[bold]align[/]: {method} matching of {len(models)} models, {len(spec.groups)} groups, "
                  f"{align_s:.1f} s; {len(spec.cut_points)} cut points")
    cand_dir = out_dir / "candidates"
    kw = dict(batch_sizes=tgt.batch_sizes, threads=tgt.threads)
    rows, files = [], {}
    depths = range(len(spec.cut_points) + 1)
    with Progress(console=console, disable=console.quiet) as progress:
        task = progress.add_task("fuse, export, measure", total=len(depths) + len(models) + 2)
        single_files = [export_onnx(m, example, cand_dir / f"single{i}.onnx", opset=tgt.opset)
                        for i, m in enumerate(models)]
        singles = [measure(models[0], x_test, y_test, single_files[0], **kw)]
        progress.advance(task)
        for m in models[1:]:  # the members share one cost; only their scores differ
            singles.append(scores(_torch_logits(m, x_test), y_test))
            progress.advance(task)
        for k in depths:
            fused = fuse(aligned, spec, depth=k, data=calib_batches, batch_heads=k > 0 and tgt.batch_heads)
            files[k] = export_onnx(fused, example, cand_dir / f"depth{k}.onnx", opset=tgt.opset)
            row = measure(fused, x_test, y_test, files[k], **kw)
            row |= {"depth": k, "module": fused, "onnx_nodes": onnx_nodes(files[k]),
                    "batched_heads": k > 0 and tgt.batch_heads}
            rows.append(row)
            progress.advance(task)
        ens_batched = rows[0]["module"].batch_heads()
        files["batched"] = export_onnx(ens_batched, example, cand_dir / "ensemble_batched.onnx", opset=tgt.opset)
        batched_row = measure(ens_batched, x_test, y_test, files["batched"], **kw)
        batched_row |= {"module": ens_batched, "onnx_nodes": onnx_nodes(files["batched"])}
        progress.advance(task)
        sessions_row = measure(rows[0]["module"], x_test, y_test, runner=SessionsRunner(single_files, tgt.threads),
                               **kw)
        sessions_row["onnx_nodes"] = sum(onnx_nodes(f) for f in single_files)
        progress.advance(task)
    ensemble = rows[0]
    exact = {"ensemble": ensemble, "ensemble_batched": batched_row, "ensemble_sessions": sessions_row}
    baseline = best_exact(exact)
    naive = fuse(models, spec, depth=len(spec.cut_points), data=calib_batches)
    chosen = depth if depth is not None else choose_depth(rows, ensemble, tgt, baseline)
    best = batched_row if chosen == 0 else rows[chosen]
    best_file = files["batched"] if chosen == 0 else files[chosen]
    for r in [*rows, batched_row, sessions_row]:
        r["agreement"] = agreement(r, ensemble)
    report = {
        "target": tgt.name, "arch": label,
        "n_models": len(models), "depth": chosen, "alpha": None, "max_depth": len(spec.cut_points),
        "align_method": method, "align_seconds": align_s, "dataset": dataset, "n_test": len(x_test),
        "threads": tgt.threads, "batch_sizes": list(tgt.batch_sizes), "batched_heads": tgt.batch_heads,
        "single": mean_rows(singles),
        **{name: public(r) for name, r in exact.items()},
        "baseline_by_batch": baseline,
        "fused": public(best) | {"depth": chosen},
        "candidates": [public(r) for r in rows],
        "naive_merge": scores(_torch_logits(naive, x_test), y_test),
        "parity": {"max_abs_diff": parity(best_file, best["module"], parity_inputs(example)),
                   "batch_sizes": [1, 3]},
    }
    if chosen > 0 and tgt.batch_heads:
        unbatched = fuse(aligned, spec, depth=chosen, data=calib_batches)
        report["fused"]["onnx_nodes_unbatched"] = onnx_nodes(
            export_onnx(unbatched, example, cand_dir / f"depth{chosen}_unbatched.onnx", opset=tgt.opset))
    if tgt.runtime == "tensorrt":
        from .build import prepare_device

        summary = f"{len(models)} × {label}, depth {chosen}/{len(spec.cut_points)}, accuracy {best['accuracy']:.4f}"
        report |= prepare_device(tgt, best["module"], best_file, example, x_test, y_test, out_dir, summary, console)
    write_report(report, out_dir)
    shutil.copyfile(best_file, out_dir / "model.onnx")  # out_dir is the staging folder: publish() is atomic
    return report


def _torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return predict(TorchRunner(model.eval(), threads=torch.get_num_threads()), x)
