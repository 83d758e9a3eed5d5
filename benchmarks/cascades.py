"""Cascades against the other plain candidates, zoo by zoo: the default zoo (4 × CNN-BN width 16, every member on
the whole training split), the same CNN on Dirichlet 0.5 label-skewed shards, and 4 × ResNet-20; zoo seeds 0, 1, 2.

Per zoo the export's own field with no fused points (run/field.measure_field: members, the exact ensembles, the
sub-ensembles picked on validation, the cascades, the best member distilled towards the best ensemble), on cpu-ort
(onnxruntime, 1 thread), and the export's chooser at half the ensemble's mean MACs, binding the mean and then the
p99. Printed per zoo, and as mean ± std over the zoo seeds: test accuracy, mean MACs and mean / p99 latency at
batch 1 as shares of the fastest exact ensemble's, all measured in the same run.

    python benchmarks/cascades.py [--zoo cnn|dirichlet|resnet20 ...] [--zoo-seed S ...] [--threads 1]

Each finished zoo is kept in build/bench/cascades/ (a stopped run resumes); build/bench/cascades.md holds the
tables."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console

from common import resumed, threads
from edgefuse.base.files import atomic_write_text
from edgefuse.models.partition import parse_partition
from edgefuse.models.zoo import zoo_models
from edgefuse.run.choose import choose, target_budget
from edgefuse.run.config import RunConfig
from edgefuse.run.field import FieldPlan, distill_config, measure_field
from edgefuse.run.setup import prepare
from edgefuse.targets import load_target

ZOOS = {"cnn": ("cnn", "all"), "dirichlet": ("cnn", "dirichlet:0.5"), "resnet20": ("resnet20", "all")}
OUT = Path("build/bench/cascades")


def measure_zoo(zoo: str, seed: int, console: Console) -> dict:
    """Every plain candidate of one zoo, as report rows, and what ships when the budget binds the mean or the p99."""
    arch, partition = ZOOS[zoo]
    models, _ = zoo_models(arch, 4, quiet=True, partition=replace(parse_partition(partition), seed=seed))
    run = RunConfig(models=tuple(models), methods=("weight",))
    s = prepare(run, console)
    tgt = load_target("cpu-ort")
    out_dir = OUT / f"{zoo}-{seed}"
    plan = FieldPlan(out_dir, distill_config(tgt), run.cache, workers=0)
    f = measure_field(s, tgt, [], target_budget(tgt), console, plan)
    rows = [c.to_json(out_dir) for c in f.rows]
    chosen = {}
    for binds in ("mean", "p99"):
        budget = replace(target_budget(tgt), binds=binds)
        c = choose(f.rows, budget, f.exact["ensemble"])
        chosen[binds] = {"key": c.chosen.key, "reason": c.reason}
    return {"zoo": zoo, "seed": seed, "rows": rows, "chosen": chosen}


def summary(zoos: list[dict]) -> list[str]:
    """Per zoo kind: each plain kind's best row within half the ensemble's mean MACs, as mean ± std over seeds."""
    lines = []
    for zoo in dict.fromkeys(z["zoo"] for z in zoos):
        runs = [z for z in zoos if z["zoo"] == zoo]
        lines += [f"## {zoo} ({len(runs)} zoo seeds: {', '.join(str(z['seed']) for z in runs)})", "",
                  "| candidate | test acc | test − ensemble | mean MACs / ens | mean b1 / best ens "
                  "| p99 b1 / best ens |",
                  "|---|---|---|---|---|---|"]
        table = {}
        for z in runs:
            by_key = {r["key"]: r for r in z["rows"]}
            ens = by_key["ensemble"]
            base = {k: min(by_key[e]["latency_by_batch"]["1"][k] for e in ("ensemble", "ensemble_batched",
                                                                         "ensemble_sessions")) for k in ("mean", "p99")}
            picks = {"best member (validation)": max((r for r in z["rows"] if r["kind"] == "member"),
                                                    key=lambda r: r["validation"]["accuracy"]),
                     "distilled member": next((r for r in z["rows"] if r["kind"] == "distilled member"), None),
                     "best sub-ensemble ≤ 0.5 (validation)": _best(z["rows"], "sub-ensemble", ens, 0.5),
                     "best cascade ≤ 0.5 mean MACs (validation)": _best(z["rows"], "cascade", ens, 0.5),
                     "exact ensemble": ens,
                     "shipped, budget binds the mean": by_key[z["chosen"]["mean"]["key"]],
                     "shipped, budget binds the p99": by_key[z["chosen"]["p99"]["key"]]}
            for name, r in picks.items():
                if r is None:
                    continue
                lat = r["latency_by_batch"]["1"]
                acc = r["test"]["accuracy"]
                table.setdefault(name, []).append((acc, acc - ens["test"]["accuracy"],
                                                   r["macs"] / ens["macs"], lat.get("mean", lat["p50"]) / base["mean"],
                                                   lat["p99"] / base["p99"]))
        for name, values in table.items():
            a = np.asarray(values)
            cells = [f"{m:.4f} ± {sd:.4f}" if i < 2 else f"{m:.2f} ± {sd:.2f}"
                     for i, (m, sd) in enumerate(zip(a.mean(0), a.std(0)))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _best(rows: list[dict], kind: str, ens: dict, share: float) -> dict | None:
    within = [r for r in rows if r["kind"] == kind and r["macs"] <= share * ens["macs"] and r["precision"] == "fp32"]
    return max(within, key=lambda r: r["validation"]["accuracy"]) if within else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", action="append", choices=sorted(ZOOS))
    ap.add_argument("--zoo-seed", action="append", type=int)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    threads(args.threads)
    console = Console(stderr=True)
    zoos = []
    for zoo in args.zoo or ["cnn", "dirichlet", "resnet20"]:
        for seed in args.zoo_seed or [0, 1, 2]:
            zoos.append(resumed(OUT / f"{zoo}-{seed}.json", lambda: measure_zoo(zoo, seed, console)))
            console.print(f"[bold]{zoo} seed {seed}[/]: ships {zoos[-1]['chosen']['mean']['key']} (mean), "
                          f"{zoos[-1]['chosen']['p99']['key']} (p99)")
    lines = ["# Cascades (python benchmarks/cascades.py)", "", *summary(zoos)]
    atomic_write_text(OUT.parent / "cascades.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
