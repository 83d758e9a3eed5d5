"""Fine-tunes of one pretrained network: the fine-tune zoo (models/finetune.py: one base pretrained on half of
Fashion-MNIST's training images, fine-tuned 4 times on the other half with seeds and learning rates of their own),
CNN-BN width 16 and ResNet-20, zoo seeds 0, 1, 2.

Per zoo: the share of units weight matching leaves in place (the regime test the export runs without --base), then
the export's own field with the base known (run/field.measure_field on cpu-ort, onnxruntime, 1 thread): members,
exact ensembles, sub-ensembles, cascades, the merges (soup, greedy soup, task arithmetic and TIES with their
parameters chosen on validation), every fusion depth with lsq repair, and the best member and depth distilled towards
the best ensemble; then the export's chooser. Printed per zoo kind as mean ± std over the zoo seeds: test accuracy,
its difference to the exact ensemble's, MACs as a share of the ensemble's, all measured in the same run.

    python benchmarks/finetunes.py [--arch cnn|resnet20 ...] [--zoo-seed S ...] [--threads 1]

Each finished zoo is kept in build/bench/finetunes/ (a stopped run resumes); build/bench/finetunes.md holds the
tables."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console

from edgefuse.align import align_perms
from common import resumed, threads as set_threads
from edgefuse.base.files import atomic_write_text
from edgefuse.models.data import load_dataset
from edgefuse.models.finetune import finetune_zoo
from edgefuse.models.partition import Partition
from edgefuse.run.choose import choose, target_budget
from edgefuse.run.config import RunConfig
from edgefuse.run.field import FieldPlan, distill_config, grid, measure_field
from edgefuse.run.setup import identity_share, prepare
from edgefuse.spec.permspec import permutation_spec
from edgefuse.targets import load_target

OUT = Path("build/bench/finetunes")


def measure_zoo(arch: str, seed: int, console: Console) -> dict:
    models, base, _ = finetune_zoo(arch, 4, quiet=True, partition=Partition(seed=seed))
    splits = load_dataset("fashion-mnist").with_calibration(None)
    spec = permutation_spec(models[0], splits.example)
    share = identity_share(align_perms(models, spec, method="weight"))
    s = prepare(RunConfig(models=tuple(models), base=base, methods=("weight",), data=splits), console)
    tgt = load_target("cpu-ort")
    out_dir = OUT / f"{arch}-{seed}"
    points = [p for p in grid(len(s.spec.cut_points), (), ("weight",), ("lsq",))]
    f = measure_field(s, tgt, points, target_budget(tgt), console, FieldPlan(out_dir, distill_config(tgt)))
    chosen = choose(f.rows, target_budget(tgt), f.exact["ensemble"])
    return {"arch": arch, "seed": seed, "identity_share": share, "rows": [c.to_json(out_dir) for c in f.rows],
            "chosen": {"key": chosen.chosen.key, "reason": chosen.reason}}


def summary(zoos: list[dict]) -> list[str]:
    lines = []
    for arch in dict.fromkeys(z["arch"] for z in zoos):
        runs = [z for z in zoos if z["arch"] == arch]
        shares = np.array([z["identity_share"] for z in runs])
        lines += [f"## {arch} ({len(runs)} zoo seeds: {', '.join(str(z['seed']) for z in runs)})", "",
                  f"Weight matching left {shares.mean():.1%} ± {shares.std():.1%} of the units in place.", "",
                  "| candidate | test acc | test − ensemble | MACs / ens |", "|---|---|---|---|"]
        table: dict[str, list] = {}
        for z in runs:
            by_key = {r["key"]: r for r in z["rows"]}
            ens = by_key["ensemble"]
            picks = {"best member (validation)": _best(z["rows"], ("member",)),
                     "exact ensemble": ens,
                     "best sub-ensemble (validation)": _best(z["rows"], ("sub-ensemble",)),
                     "best cascade ≤ 0.5 MACs (validation)": _best(z["rows"], ("cascade",), ens, 0.5),
                     "distilled member": _best(z["rows"], ("distilled member",))}
            picks |= {r["label"].split(" of ")[0]: r for r in z["rows"] if r["kind"] == "merge"}
            picks |= {r["label"].split(" (")[0] + (" + distill" if (r["point"] or {}).get("distill") else ""): r
                      for r in z["rows"] if r["kind"] == "fused"}
            picks["shipped"] = by_key[z["chosen"]["key"]]
            for name, r in picks.items():
                if r is not None:
                    acc = r["test"]["accuracy"]
                    table.setdefault(name, []).append((acc, acc - ens["test"]["accuracy"], r["macs"] / ens["macs"]))
        for name, values in table.items():
            a = np.asarray(values)
            cells = [f"{m:+.4f} ± {sd:.4f}" if i == 1 else f"{m:.4f} ± {sd:.4f}" if i == 0 else f"{m:.2f}"
                     for i, (m, sd) in enumerate(zip(a.mean(0), a.std(0)))]
            lines.append(f"| {name} ({len(values)}) | " + " | ".join(cells) + " |")
        lines += ["", "Shipped: " + "; ".join(f"seed {z['seed']}: {z['chosen']['key']}" for z in runs), ""]
    return lines


def _best(rows: list[dict], kinds: tuple[str, ...], ens: dict | None = None, share: float = 1.0) -> dict | None:
    within = [r for r in rows if r["kind"] in kinds and r["precision"] == "fp32"
              and (ens is None or r["macs"] <= share * ens["macs"])]
    return max(within, key=lambda r: r["validation"]["accuracy"]) if within else None


def run(archs: tuple[str, ...] = ("cnn", "resnet20"), seeds: tuple[int, ...] = (0, 1, 2), threads: int = 1) -> dict:
    """Every zoo measured (or read back), the tables written to build/bench/finetunes.md; {arch-seed: zoo}."""
    set_threads(threads)
    console = Console(stderr=True)
    zoos = []
    for arch in archs:
        for seed in seeds:
            zoos.append(resumed(OUT / f"{arch}-{seed}.json", lambda: measure_zoo(arch, seed, console)))
            console.print(f"[bold]{arch} seed {seed}[/]: ships {zoos[-1]['chosen']['key']}")
    lines = [f"# Fine-tunes (python benchmarks/finetunes.py, {threads} thread(s))", "", *summary(zoos)]
    atomic_write_text(OUT.parent / "finetunes.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return {f"{z['arch']}-{z['seed']}": {"identity_share": z["identity_share"], "chosen": z["chosen"]} for z in zoos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=("cnn", "resnet20"))
    ap.add_argument("--zoo-seed", action="append", type=int)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    run(tuple(args.arch or ("cnn", "resnet20")), tuple(args.zoo_seed or (0, 1, 2)), args.threads)


if __name__ == "__main__":
    main()
