"""The main job: models → spec → align → fuse at every depth → export → measure → report, for one target."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
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
from .fuse import ensemble, fuse
from .spec import permutation_spec
from .runtime import SessionsRunner, TorchRunner, peak_memory_mb, predict
from .sweep import DEFAULT_ALPHAS, Job, Point, choose, grid, run_points
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
    fused = [c for c in candidates if (c.get("depth") or 0) >= 1]
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


@dataclass
class Setup:
    """Models, data and alignment shared by every candidate of one run."""
    models: list[nn.Module]
    label: str
    calib: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    spec: object
    aligned: dict[str, list[nn.Module]]
    align_seconds: dict[str, float]
    dataset: str

    @property
    def example(self) -> torch.Tensor:
        return self.x_test[:2]

    @property
    def calib_batches(self) -> list[torch.Tensor]:
        return datasets.batches(self.calib, batch_size=200)


def prepare(models: list[nn.Module] | None, arch: str, n: int, dataset: str, cache: str | Path,
            methods: tuple[str, ...], console: Console) -> Setup:
    label = arch if models is None else type(models[0]).__name__
    if models is None:
        from .zoo import zoo_models
        console.print(f"[bold]zoo[/]: {n} × {arch} on Fashion-MNIST (cached under {cache})")
        models, _ = zoo_models(arch, n, cache=cache, quiet=console.quiet)
    check_models(models, "export")
    calib, x_test, y_test = load_dataset(dataset)
    spec = permutation_spec(models[0], x_test[:2])
    aligned, seconds = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        aligned[method] = align(models, spec, method=method, data=datasets.batches(calib, batch_size=200))
        seconds[method] = time.perf_counter() - t0
        console.print(f"[bold]align[/]: {method} matching of {len(models)} models, {len(spec.groups)} groups, "
                      f"{seconds[method]:.1f} s; {len(spec.cut_points)} cut points")
    return Setup(models, label, calib, x_test, y_test, spec, aligned, seconds, dataset)


def baselines(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, tgt: Target,
              cand_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    """The members' scores and the three exact ensembles (one graph, batched, N sessions), measured alike."""
    kw = dict(batch_sizes=tgt.batch_sizes, threads=tgt.threads)
    big, example = max(tgt.batch_sizes), x[:2]
    files = [export_onnx(m, example, cand_dir / f"single{i}.onnx", opset=tgt.opset) for i, m in enumerate(models)]
    singles = [measure(models[0], x, y, files[0], **kw) | {"onnx_nodes": onnx_nodes(files[0]),
                                                          "peak_memory_mb": peak_memory_mb(files[:1], big)}]
    singles += [scores(_torch_logits(m, x), y) for m in models[1:]]
    seq = ensemble(models)
    exact = {}
    for name, module in (("ensemble", seq), ("ensemble_batched", seq.batch_heads())):
        path = export_onnx(module, example, cand_dir / f"{name}.onnx", opset=tgt.opset)
        exact[name] = measure(module, x, y, path, **kw) | {
            "module": module, "file": str(path), "onnx_nodes": onnx_nodes(path), "depth": 0, "alpha": None,
            "peak_memory_mb": peak_memory_mb([path], big, tgt.threads)}
    exact["ensemble_sessions"] = measure(seq, x, y, runner=SessionsRunner(files, tgt.threads), **kw) | {
        "onnx_nodes": sum(onnx_nodes(f) for f in files), "peak_memory_mb": peak_memory_mb(files, big, tgt.threads)}
    for r in exact.values():
        r["agreement"] = agreement(r, exact["ensemble"])
    return singles, exact


def candidates(s: Setup, tgt: Target, points: list, cand_dir: Path, ensemble_predictions: np.ndarray,
               console: Console, workers: int = 0, ray_address: str | None = None, store: Path | None = None,
               key: str = "", steps: int = 600) -> list[dict]:
    jobs = [Job(p, s.aligned[p.method], s.dataset, tgt.opset, tgt.batch_sizes, tgt.threads, tgt.batch_heads,
                str(cand_dir), ensemble_predictions, steps, keep_module=workers == 0 and store is None)
            for p in points]
    with Progress(console=console, disable=console.quiet) as progress:
        task = progress.add_task(f"fuse, export, measure {len(jobs)} candidates", total=len(jobs))
        return run_points(jobs, workers, ray_address, store, key, (progress, task))


def _run(tgt: Target, models: list[nn.Module] | None, arch: str, n: int, dataset: str, out_dir: Path,
         cache: str | Path, method: str, depth: int | None, console: Console) -> dict:
    s = prepare(models, arch, n, dataset, cache, (method,), console)
    if depth is not None and not 0 <= depth <= len(s.spec.cut_points):
        raise EdgefuseError(f"depth must be between 0 and {len(s.spec.cut_points)} for this model, got {depth}")
    cand_dir = out_dir / "candidates"
    singles, exact = baselines(s.models, s.x_test, s.y_test, tgt, cand_dir)
    budget = tgt.runtime == "onnxruntime" and (tgt.latency_budget_ms or tgt.memory_budget_mb)
    points = grid(len(s.spec.cut_points), DEFAULT_ALPHAS if budget and depth is None else (), (method,))
    rows = candidates(s, tgt, points, cand_dir, exact["ensemble"]["predictions"], console)
    base = best_exact(exact)
    if depth is not None:
        best = exact["ensemble_batched"] if depth == 0 else next(r for r in rows if r["depth"] == depth)
    elif budget:
        best = choose(rows, exact, tgt.latency_budget_ms, tgt.memory_budget_mb)
    else:
        chosen = choose_depth([exact["ensemble"] | {"depth": 0}] + rows, exact["ensemble"], tgt, base)
        best = exact["ensemble_batched"] if chosen == 0 else next(r for r in rows if r["depth"] == chosen)
    if tgt.distill_steps and "point" in best:  # the chosen point, distilled towards the ensemble
        point = Point(**(best["point"] | {"repair": "distill"}))
        console.print(f"[bold]distill[/]: {best['label']}, {tgt.distill_steps} steps towards the ensemble")
        best = candidates(s, tgt, [point], cand_dir, exact["ensemble"]["predictions"], console,
                          steps=tgt.distill_steps)[0]
        rows.append(best)
    naive = fuse(s.models, s.spec, depth=len(s.spec.cut_points), data=s.calib_batches)
    report = {
        "target": tgt.name, "arch": s.label, "n_models": len(s.models), "depth": best["depth"],
        "alpha": best["alpha"], "max_depth": len(s.spec.cut_points), "align_method": method,
        "align_seconds": s.align_seconds[method], "dataset": dataset, "n_test": len(s.x_test),
        "threads": tgt.threads, "batch_sizes": list(tgt.batch_sizes), "batched_heads": tgt.batch_heads,
        "single": mean_rows(singles), **{name: public(r) for name, r in exact.items()},
        "baseline_by_batch": base, "fused": public(best) | {"label": best.get("label", "ensemble, batched")},
        "candidates": [public(exact["ensemble"]) | {"label": "ensemble"}] + [public(r) for r in rows],
        "naive_merge": scores(_torch_logits(naive, s.x_test), s.y_test),
        "parity": {"max_abs_diff": parity(best["file"], best["module"], parity_inputs(s.example)),
                   "batch_sizes": [1, 3]},
    }
    if best["depth"] and tgt.batch_heads:
        unbatched = fuse(s.aligned[method], s.spec, depth=best["depth"], data=s.calib_batches)
        report["fused"]["onnx_nodes_unbatched"] = onnx_nodes(
            export_onnx(unbatched, s.example, cand_dir / "chosen_unbatched.onnx", opset=tgt.opset))
    if tgt.runtime == "tensorrt":
        from .build import prepare_device

        summary = f"{len(s.models)} × {s.label}, {report['fused']['label']}, accuracy {best['accuracy']:.4f}"
        report |= prepare_device(tgt, best["module"], Path(best["file"]), s.example, s.x_test, s.y_test, out_dir,
                                 summary, console)
    write_report(report, out_dir)
    shutil.copyfile(best["file"], out_dir / "model.onnx")  # out_dir is the staging folder: publish() is atomic
    return report


def _torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return predict(TorchRunner(model.eval(), threads=torch.get_num_threads()), x)
