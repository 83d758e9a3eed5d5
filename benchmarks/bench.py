"""`make bench`: the zoo (Fashion-MNIST, N=4) through the whole pipeline on cpu-ort, every depth measured in one run,
and alignment: loss barriers and merged accuracy per method on trained MLPs, and the time to align N = 2, 4, 8
ResNet-20s and ResNet-18-sized nets (align_scaling.py); INT8 against FP32 (int8.py); fused models against the
distilled member at three MACs budgets, 3 distillation seeds, two zoos (fused_vs_distilled.py); peak memory and
throughput of distilling from a folder of 20,000 JPEGs (data_memory.py); BN reset, REPAIR and the least-squares
repair at every depth and alpha before distillation (repairs.py); where fusion ships, on zoos trained on IID and
label-skewed shards (regimes.py); ZipIt!-style merges against weight and activation matching (zipit.py); merges,
fused depths and the plain candidates on fine-tunes of one pretrained network (finetunes.py); Vision Transformers:
weight matching at ViT-S/B scale and the ViT zoo with repairs none and lsq (vit.py).

Prints, per architecture, accuracy and the MACs and p50 latency ratios against the ensemble measured in the same
run, and writes build/bench/bench.json."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.base.files import atomic_write_text
from edgefuse.fuse.split import average_state
from edgefuse.jobs.export import run_export

ARCHS = ("mlp", "cnn")
# BENCH_CURVES=cnn skips the ResNet-20 curve (most of make bench's hour on 2 cores); curves.py runs one alone.
CURVE_ARCHS = tuple(os.environ.get("BENCH_CURVES", "cnn,resnet20").split(","))
METHODS = (("weight", {}), ("activation", {}), ("ot", {}), ("ot", {"reg": 0.05}))


def _name(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


def _merged_accuracy(models: list, spec, x: torch.Tensor, y: torch.Tensor) -> float:
    merged = ef.permute(models[0], spec, spec.identity_perms())
    merged.load_state_dict(average_state(models))
    with torch.no_grad():
        return float((merged(x).argmax(1) == y).double().mean())


def alignment_quality(console: Console) -> dict:
    """Trained Fashion-MNIST MLPs: barrier of a pair and accuracy of the 4-model average, naive vs each method."""
    models, _ = zoo.zoo_models("mlp", 4, quiet=True)
    splits = data.load_dataset("fashion-mnist")
    x, y = splits.x_test, splits.y_test
    calib = data.batches(splits.calib, batch_size=250)
    test = data.batches(x, y, batch_size=1000)
    spec = ef.permutation_spec(models[0], x[:2])
    rows = {"naive": {"loss_barrier": ef.barrier(*models[:2], test)["loss_barrier"],
                      "midpoint_accuracy": ef.barrier(*models[:2], test, steps=3)["accuracy"][1],
                      "merged4_accuracy": _merged_accuracy(models, spec, x, y)}}
    for method, options in METHODS:
        opts = dict(options, data=calib) if method == "activation" else options
        pair = ef.align(models[:2], spec, method, **opts)
        curve = ef.barrier(*pair, test)
        rows[_name(method, options)] = {"loss_barrier": curve["loss_barrier"], "midpoint_accuracy": curve["accuracy"][5],
                                        "merged4_accuracy": _merged_accuracy(ef.align(models, spec, method, **opts),
                                                                             spec, x, y)}
    table = Table(title="alignment quality: 4 × MLP on Fashion-MNIST (pair barrier over 11 points, test set)")
    for col in ("method", "loss barrier", "/ naive", "midpoint acc", "average of 4: acc"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['loss_barrier']:.4f}", f"{r['loss_barrier'] / rows['naive']['loss_barrier']:.3f}",
                      f"{r['midpoint_accuracy']:.4f}", f"{r['merged4_accuracy']:.4f}")
    console.print(table)
    return rows


def half_latency_sweep(console: Console, out_root: Path) -> dict:
    """cpu-ort with a latency budget of half the fastest exact ensemble's p50 at each batch size: what ships?"""
    from edgefuse.base.errors import EdgefuseError
    from edgefuse.jobs.sweep import run_sweep

    report = json.loads((out_root / "cnn" / "cpu-ort" / "report.json").read_text())
    budget = tuple(0.5 * e["p50"] for e in report["baseline_by_batch"].values())
    try:
        sweep = run_sweep("cpu-ort", console, arch="cnn", latency_ms=budget, out_root=str(out_root / "cnn"))
    except EdgefuseError as e:
        console.print(f"half-latency sweep: {e}")
        return {"latency_ms": budget, "error": str(e)}
    chosen = sweep["fused"]
    base = sweep["baseline_by_batch"]["1"]
    console.print(f"half-latency sweep (p50 ≤ {', '.join(f'{v:.3f}' for v in budget)} ms): {chosen['label']} "
                  f"({chosen['kind']}), validation {chosen['validation']['accuracy']:.4f}, test "
                  f"{chosen['accuracy']:.4f}, MACs {chosen['macs'] / sweep['ensemble']['macs']:.2f}, p50 "
                  f"{chosen['latency_by_batch']['1']['p50']:.3f} ms ({chosen['latency_by_batch']['1']['p50'] / base['p50']:.2f}"
                  f" of {base['name']})")
    return {"latency_ms": budget, "chosen": chosen["label"], "kind": chosen["kind"], "accuracy": chosen["accuracy"],
            "macs_ratio": chosen["macs"] / sweep["ensemble"]["macs"],
            "p50_ratio": chosen["latency_by_batch"]["1"]["p50"] / base["p50"], "baseline": base["name"]}


def main(out_root: Path = Path("build/bench")) -> int:
    from align_scaling import alignment_time

    console = Console(width=160)
    results: dict = {"alignment_quality": alignment_quality(console), "alignment_seconds": alignment_time(console)}
    for arch in ARCHS:
        report = run_export("cpu-ort", arch=arch, n=4, out_root=str(out_root / arch), force=True)
        ens, base = report["ensemble"], report["baseline_by_batch"]
        batches = list(ens["latency_by_batch"])
        table = Table(title=f"{arch} × 4, cpu-ort (align {report['align_seconds']:.2f} s, unaligned full merge "
                            f"{report['naive_merge']['accuracy']:.4f}); shipped: {report['shipped']['label']}; "
                            "latency ratios against the fastest exact ensemble: " +
                            ", ".join(f"b{b} {e['name']}" for b, e in base.items()))
        for col in ["model", "kind", "val acc", "test acc", "agreement", "ONNX nodes", "MACs / ens"] + \
                   [f"p50 / best ens b{b}" for b in batches] + [f"lat/MACs b{b}" for b in batches] + ["dominated by"]:
            table.add_column(col, justify="right")
        summary = []
        for r in report["candidates"]:
            macs_ratio = r["macs"] / ens["macs"]
            lat = [r["latency_by_batch"][b]["p50"] / base[b]["p50"] for b in batches]
            table.add_row(r["label"], r["kind"], f"{r['validation']['accuracy']:.4f}", f"{r['accuracy']:.4f}",
                          f"{r['agreement']:.3f}", str(r.get("onnx_nodes", "-")), f"{macs_ratio:.2f}",
                          *(f"{v:.2f}" for v in lat), *(f"{v / macs_ratio:.2f}" for v in lat),
                          r["dominated_by"] or "-")
            summary.append({"model": r["label"], "kind": r["kind"], "validation_accuracy": r["validation"]["accuracy"],
                            "accuracy": r["accuracy"], "macs_ratio": macs_ratio, "onnx_nodes": r.get("onnx_nodes"),
                            "p50_ratio": dict(zip(batches, lat)), "dominated_by": r["dominated_by"]})
        console.print(table)
        results[arch] = {"ensemble_accuracy": ens["accuracy"], "single_accuracy": report["single"]["accuracy"],
                         "shipped": report["shipped"], "align_seconds": report["align_seconds"], "rows": summary}
    results["sweep_half_latency"] = half_latency_sweep(console, out_root)
    from int8 import int8_table

    results["int8"] = int8_table(console, out_root / "int8")
    from curves import curves

    results["curves"] = {arch: curves(arch, console, out_root) for arch in CURVE_ARCHS}
    from fused_vs_distilled import main as fused_vs_distilled

    results["fused_vs_distilled"] = fused_vs_distilled(out_root)
    from repairs import repairs_table

    results["repairs"] = repairs_table("cnn")
    from regimes import run as regimes

    results["regimes"] = regimes()
    from zipit import run as zipit

    results["zipit"] = zipit()
    from finetunes import run as finetunes

    results["finetunes"] = finetunes()
    from vit import run as vit

    results["vit"] = vit()
    from data_memory import data_memory

    results["data_memory"] = data_memory(out_root)
    atomic_write_text(out_root / "bench.json", json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out_root / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
