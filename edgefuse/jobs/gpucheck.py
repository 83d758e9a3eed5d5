"""`make gpu-check`: single / ensemble / batched ensemble / fused at every depth on one CUDA GPU, fp32 and fp16,
eager and CUDA-graph replay, at the target's batch sizes, on the Fashion-MNIST test set.

Runs with `PYTHONPATH=.` and no install step on a machine that has torch (CUDA), numpy, scipy, onnx, click, rich,
matplotlib and safetensors: no onnxsim, no POT, no onnxruntime-gpu. Trained weights are read from build/cache and
never retrained there."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch
from rich.console import Console
from torch import nn

from ..align import align
from ..measure.cuda import DTYPES, CudaRunner, require_cuda
from ..models.data import load_dataset
from ..base.files import atomic_write_text
from ..fuse import fuse
from ..measure.metrics import macs, params, scores
from ..measure.runners import latency, latency_batch, predict
from ..spec.permspec import permutation_spec
from ..targets import Target, load_target
from ..models.zoo import zoo_models

EXACT = ("ensemble", "ensemble_batched")
MODES = ("graph", "eager")


def _variants(models: list[nn.Module], calib: list[torch.Tensor], example: torch.Tensor, method: str) -> dict:
    spec = permutation_spec(models[0], example)
    aligned = align(models, spec, method=method, data=calib)
    ens = fuse(aligned, spec, depth=0)
    out = {"single": models[0], "ensemble": ens, "ensemble_batched": ens.batch_heads()}
    for k in range(1, len(spec.cut_points) + 1):
        fused = fuse(aligned, spec, depth=k, data=calib)
        out[f"fused_d{k}"] = fused
        out[f"fused_d{k}_batched"] = fused.batch_heads()
    return out


def _row(module: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, batch_sizes: tuple[int, ...],
         budget_s: float) -> dict:
    row: dict = {"latency_ms": {}, "peak_memory_mb": {}}
    for mode in MODES:
        runner = CudaRunner(module, precision, graphs=mode == "graph")
        if mode == "graph":
            logits = predict(runner, x, batch_size=250)
            row |= scores(logits.astype(np.float64), y)
            row["logits"] = logits
        for b in batch_sizes:
            xb = latency_batch(x, b)
            row["latency_ms"].setdefault(str(b), {})[mode] = latency(runner, xb, budget_s=budget_s)
            if mode == "eager":
                row["peak_memory_mb"][str(b)] = runner.peak_memory_mb(xb)
        del runner
        torch.cuda.empty_cache()
    return row


def run_gpu_check(target: str | Target = "desktop-cuda", arch: str = "cnn", n: int = 4,
                  cache: str | Path = "build/cache", out_root: str | Path = "build", budget_s: float = 0.25,
                  method: str = "weight", console: Console | None = None) -> dict:
    """Measure every variant and write out_root/<target>/<arch>/report.{json,md}; returns the report. `method` is
    the alignment (activation matching suits narrow residual nets, where weight matching fails)."""
    console = console or Console(stderr=True)
    tgt = target if isinstance(target, Target) else load_target(target)
    gpu = require_cuda()
    started = time.perf_counter()
    models, _ = zoo_models(arch, n, cache=cache, quiet=True, train=False)
    splits = load_dataset("fashion-mnist")
    x_test, y_test = splits.x_test, splits.y_test
    variants = _variants(models, splits.calib_batches, x_test[:2], method)
    console.print(f"[bold]gpu-check[/] on {gpu}: {len(variants)} variants × {len(DTYPES)} precisions × "
                  f"{len(MODES)} modes × batch {', '.join(map(str, tgt.batch_sizes))}")
    report: dict = {"target": tgt.name, "gpu": gpu, "torch": torch.__version__, "arch": arch, "n_models": n,
                    "align_method": method,
                    "dataset": "fashion-mnist", "n_test": len(x_test), "batch_sizes": list(tgt.batch_sizes),
                    "precisions": {}}
    for precision in DTYPES:
        rows = {}
        for name, module in variants.items():
            rows[name] = _row(module, x_test, y_test, precision, tgt.batch_sizes, budget_s)
            rows[name] |= {"macs": macs(module, x_test[:1]), "params": params(module)}
            console.print(f"  {precision} {name}: accuracy {rows[name]['accuracy']:.4f}")
        ref = rows["ensemble"]["logits"]
        for name, r in rows.items():
            got = r.pop("logits")
            if name in EXACT:
                r["max_rel_diff_vs_ensemble"] = float(np.abs(got - ref).max() / np.abs(ref).max())
        report["precisions"][precision] = rows
    report["seconds"] = time.perf_counter() - started
    out = Path(out_root) / tgt.name / arch
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    console.print(f"wrote {out}/report.json and report.md in {report['seconds']:.0f} s")
    return report


def best_exact(rows: dict, batch: str, mode: str) -> tuple[str, float]:
    return min(((name, rows[name]["latency_ms"][batch][mode]["p50"]) for name in EXACT), key=lambda e: e[1])


def markdown(report: dict) -> str:
    """One table per precision: p50 per batch size in both modes, as ratios to the fastest exact ensemble."""
    batches = [str(b) for b in report["batch_sizes"]]
    lines = [f"# edgefuse gpu-check: {report['target']} on {report['gpu']}", "",
             f"{report['n_models']} × {report['arch']} ({report['align_method']} matching), Fashion-MNIST test "
             f"set ({report['n_test']} images), torch {report['torch']}. Latency: p50 from CUDA events, input "
             "already on the GPU; 'graph' is CUDA-graph replay. Ratios are against the fastest exact ensemble (sequential or batched) at that precision, "
             "batch size and mode. Peak memory: weights, input and what one eager call allocates.", ""]
    for precision, rows in report["precisions"].items():
        ens_macs = rows["ensemble"]["macs"]
        cols = [f"b{b} {m} ms | / best" for b in batches for m in MODES] + [f"peak MB b{batches[-1]}"]
        lines += [f"## {precision}", "", "| model | accuracy | MACs / ens | " + " | ".join(cols) + " |",
                  "|" + "---|" * (2 + 2 * len(cols))]
        for name, r in rows.items():
            cells = [name, f"{r['accuracy']:.4f}", f"{r['macs'] / ens_macs:.2f}"]
            for b in batches:
                for m in MODES:
                    p50 = r["latency_ms"][b][m]["p50"]
                    cells += [f"{p50:.3f}", f"{p50 / best_exact(rows, b, m)[1]:.2f}"]
            cells.append(f"{r['peak_memory_mb'][batches[-1]]:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        diff = rows["ensemble_batched"]["max_rel_diff_vs_ensemble"]
        lines += ["", f"Batched vs sequential ensemble: max relative difference {diff:.2e}. Fastest exact ensemble: " +
                  ", ".join(f"b{b} {m}: {best_exact(rows, b, m)[0]}" for b in batches for m in MODES) + ".", ""]
    return "\n".join(lines)


@click.command()
@click.option("--arch", "archs", multiple=True, default=("cnn",), show_default=True,
              help="zoo architecture(s), trained weights read from --cache")
@click.option("--align", "method", default="weight", show_default=True, help="alignment method")
@click.option("--target", default="desktop-cuda", show_default=True)
@click.option("--cache", default="build/cache", show_default=True)
@click.option("--out", "out_root", default="build", show_default=True, help="reports go to OUT/TARGET/ARCH/")
def main(archs: tuple[str, ...], method: str, target: str, cache: str, out_root: str) -> None:
    """Entry point of `make gpu-check`: errors a user can fix are one line and exit 1."""
    from ..base.errors import EdgefuseError

    try:
        for arch in archs:
            run_gpu_check(target, arch, cache=cache, out_root=out_root, method=method)
    except EdgefuseError as e:
        raise SystemExit(f"gpu-check: error: {e}") from None


if __name__ == "__main__":
    main()
