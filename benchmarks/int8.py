"""INT8 against FP32 for `make bench`: the zoo CNN and ResNet-20 (Fashion-MNIST, N = 4), for a member, the
ensemble (one graph), the batched ensemble and fused points with BN reset. Each FP32 graph is quantized (QDQ,
symmetric, per-channel weights, calibrated on 512 training images) and both are measured the same way in the same
run: test accuracy with onnxruntime on every core, p50 latency with one thread (the cpu-ort target) at batch 1 and 32,
and the largest gap between onnxruntime's INT8 kernels and onnx's reference QDQ arithmetic on 16 test images.
Run alone: python benchmarks/int8.py (writes build/bench/int8.json)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.graph.int8 import quantize_int8, reference_parity
from edgefuse.base.files import atomic_write_text
from edgefuse.measure.metrics import scores
from edgefuse.measure.runners import OrtRunner, latency, latency_batch, predict

ARCHS = (("cnn", "weight"), ("resnet20", "activation"))  # resnet20: weight matching fails on it (see curves.py)
BATCHES = (1, 32)


def _graphs(arch: str, method: str, splits, out: Path) -> dict[str, Path]:
    models, _ = zoo.zoo_models(arch, 4, quiet=True)
    spec = ef.permutation_spec(models[0], splits.example)
    aligned = ef.align(models, spec, method, data=splits.calib_batches)
    cuts = len(spec.cut_points)
    modules = {"member 0": models[0], "ensemble": ef.ensemble(aligned),
               "ensemble, batched": ef.ensemble(aligned, batched=True)}
    for depth in sorted({max(1, cuts // 2), cuts}):
        modules[f"depth {depth}"] = ef.fuse(aligned, spec, depth=depth, data=splits.calib_batches)
    for alpha in (0.25, 0.5):
        modules[f"alpha {alpha:g}"] = ef.fuse(aligned, spec, alpha=alpha, data=splits.calib_batches)
    return {name: ef.export_onnx(m, splits.example, out / f"{arch}-{name.replace(' ', '_').replace(',', '')}.onnx")
            for name, m in modules.items()}


def int8_table(console: Console, out: Path = Path("build/bench/int8")) -> dict:
    splits = data.load_dataset("fashion-mnist")
    result: dict = {}
    for arch, method in ARCHS:
        table = Table(title=f"INT8 vs FP32: {arch} × 4 ({method} matching), onnxruntime CPU, test accuracy and p50 "
                            "with 1 thread, ratios INT8 / FP32 from the same run")
        for col in ("model", "FP32 acc", "INT8 acc", "drop (points)", *(f"p50 ratio b{b}" for b in BATCHES),
                    "ORT vs QDQ reference"):
            table.add_column(col, justify="right")
        rows = {}
        for name, fp32 in _graphs(arch, method, splits, out).items():
            q = quantize_int8(fp32, splits.x_train, fp32.with_name(fp32.stem + "-int8.onnx"))
            acc = {p: scores(predict(OrtRunner(f, 2), splits.x_test), splits.y_test)["accuracy"]
                   for p, f in (("fp32", fp32), ("int8", q.path))}
            p50 = {p: {b: latency(OrtRunner(f, 1), latency_batch(splits.x_test, b))["p50"] for b in BATCHES}
                   for p, f in (("fp32", fp32), ("int8", q.path))}
            ratio = {b: p50["int8"][b] / p50["fp32"][b] for b in BATCHES}
            gap = reference_parity(q.path, splits.x_test[:16].numpy())
            rows[name] = {"fp32_accuracy": acc["fp32"], "int8_accuracy": acc["int8"], "p50_ms": p50,
                          "p50_ratio": ratio, "reference_gap": gap, "quantization": q.summary()}
            table.add_row(name, f"{acc['fp32']:.4f}", f"{acc['int8']:.4f}", f"{100 * (acc['fp32'] - acc['int8']):+.2f}",
                          *(f"{ratio[b]:.2f}" for b in BATCHES), f"{gap:.1e}")
        console.print(table)
        result[arch] = rows
    return result


if __name__ == "__main__":
    res = int8_table(Console(width=160))
    atomic_write_text(Path("build/bench/int8.json"), json.dumps(res, indent=2) + "\n")
    sys.exit(0)
