"""`make bench`: the zoo (Fashion-MNIST, N=4) through the whole pipeline on cpu-ort, every depth measured in one run.

Prints, per architecture, accuracy and the MACs and p50 latency ratios against the ensemble measured in the same
run, and writes build/bench/bench.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgefuse.files import atomic_write_text
from edgefuse.pipeline import run_export

ARCHS = ("mlp", "cnn")


def main(out_root: Path = Path("build/bench")) -> int:
    console = Console(width=160)
    results = {}
    for arch in ARCHS:
        report = run_export("cpu-ort", arch=arch, n=4, out_root=out_root / arch, force=True)
        ens = report["ensemble"]
        batches = list(ens["latency_by_batch"])
        table = Table(title=f"{arch} × 4, cpu-ort (align {report['align_seconds']:.2f} s, unaligned full merge "
                            f"{report['naive_merge']['accuracy']:.4f})")
        for col in ["model", "accuracy", "agreement", "MACs / ens"] + [f"p50 / ens b{b}" for b in batches] + \
                   [f"lat/MACs b{b}" for b in batches]:
            table.add_column(col, justify="right")
        rows = [("single", report["single"]), *((f"depth {c['depth']}", c) for c in report["candidates"])]
        summary = []
        for name, r in rows:
            macs_ratio = r["macs"] / ens["macs"]
            lat = [r["latency_by_batch"][b]["p50"] / ens["latency_by_batch"][b]["p50"] for b in batches]
            table.add_row(name, f"{r['accuracy']:.4f}", f"{r['agreement']:.3f}" if "agreement" in r else "-",
                          f"{macs_ratio:.2f}", *(f"{v:.2f}" for v in lat), *(f"{v / macs_ratio:.2f}" for v in lat))
            summary.append({"model": name, "accuracy": r["accuracy"], "macs_ratio": macs_ratio,
                            "p50_ratio": dict(zip(batches, lat))})
        console.print(table)
        results[arch] = {"ensemble_accuracy": ens["accuracy"], "single_accuracy": report["single"]["accuracy"],
                         "align_seconds": report["align_seconds"], "rows": summary}
    atomic_write_text(out_root / "bench.json", json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out_root / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
