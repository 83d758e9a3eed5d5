"""Where fusion ships: zoos trained on IID shards, on label-skewed shards (Dirichlet 0.5 per class) and on strongly
skewed ones (Dirichlet 0.1), 3 zoo seeds each (4 × CNN-BN width 16, Fashion-MNIST, weight matching).

Per zoo: every member, the sub-ensembles picked by greedy forward selection on validation, the exact ensemble,
every depth and alpha 0.25 / 0.5 with no repair, BN reset, REPAIR and the least-squares repair, then distilled
(500 steps × 128, the export's budget, towards the ensemble, full or sub, most accurate on validation) the best
member and, at ≤ 0.30 of the ensemble's MACs, the more accurate of the export's depth and alpha picks (two
students rather than the export's three to seven: a zoo still takes 14–20 minutes on one core). At ≤ 0.30,
≤ 0.55 and ≤ 0.80 of the ensemble's MACs the run's own chooser (run/choose.choose, validation only, its noise
rule) picks what ships; MACs stand in for latency, as they do for a TensorRT target on the host, so the figures
do not depend on how busy the machine is. Accuracies are
mean ± standard deviation over the zoos; the fused rows of the repairs other than lsq are scored on validation
only (they show how the repairs compare; one that ships is scored on test too).

    python benchmarks/regimes.py [--seeds 3] [--zoo-seed S ...] [--regime NAME ...] [--threads 1]

Each finished zoo is kept in build/bench/regimes/ (a stopped run resumes); build/bench/regimes.json and
build/bench/regimes.md hold the tables."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import edgefuse as ef
from common import resumed, threads as set_threads
from edgefuse.base.files import atomic_write_text
from edgefuse.fuse import distill, ensemble
from edgefuse.measure.metrics import scores
from edgefuse.models import data, zoo
from edgefuse.models.partition import Partition
from edgefuse.run.baselines import select_members
from edgefuse.run.candidate import Candidate, Point
from edgefuse.run.choose import Budget, choose, fits
from edgefuse.run.field import Field, distill_config, distill_picks, teacher_of
from edgefuse.targets import load_target

REGIMES = {"IID shards": Partition("iid"), "Dirichlet 0.5": Partition("dirichlet", 0.5),
           "Dirichlet 0.1": Partition("dirichlet", 0.1)}
BUDGETS = (0.30, 0.55, 0.80)
REPAIRS = (None, "bn", "repair", "lsq")
ALPHAS = (0.25, 0.5)
OUT = Path("build/bench")


def _logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model.eval()(x[i:i + 1000]) for i in range(0, len(x), 1000)]).numpy()


def row(module: torch.nn.Module, splits, ens_macs: int | None, test: bool = True, **fields) -> Candidate:
    """A candidate scored like the export scores it, with its MACs share as its latency (`ens_macs` None: it is
    the ensemble itself). `test=False`: validation only (what the choice reads), to save the time of rows that
    only show how repairs compare; a shipped one is scored on test afterwards."""
    val = _logits(module, splits.x_val)
    m = ef.macs(module, splits.x_test[:1])
    return Candidate(validation=scores(val, splits.y_val), test=_test(module, splits) if test else {}, macs=m,
                     params=ef.params(module), latency_by_batch={"1": {"p50": m / (ens_macs or m)}},
                     runtime="MACs", val_correct=val.argmax(1) == splits.y_val.numpy(), **fields)


def _test(module: torch.nn.Module, splits) -> dict:
    return scores(_logits(module, splits.x_test), splits.y_test)


def measure_zoo(partition: Partition, seed: int) -> dict:
    """Every candidate of one zoo, and what the chooser ships at each budget."""
    models, _ = zoo.zoo_models("cnn", 4, quiet=True, partition=replace(partition, seed=seed))
    splits = data.load_dataset("fashion-mnist")
    spec = ef.permutation_spec(models[0], splits.example)
    aligned = ef.align(models, spec)
    ens = row(ensemble(aligned, batched=True), splits, None, key="ensemble", label="ensemble", kind="ensemble")
    members = [row(m, splits, ens.macs, key=f"member{i}", label=f"member {i}", kind="member",
                   point=Point("member", i, repair=None)) for i, m in enumerate(aligned)]
    subs = [row(ensemble([aligned[i] for i in s], batched=True), splits, ens.macs, key=f"sub{'-'.join(map(str, s))}",
                label=f"best {len(s)}", kind="sub-ensemble", members=s) for s in
            select_members(np.stack([_logits(m, splits.x_val) for m in aligned]), splits.y_val)]
    fused, seconds, modules = [], {}, {}
    for repair in REPAIRS:
        for kind, values in (("depth", range(1, len(spec.cut_points) + 1)), ("alpha", ALPHAS)):
            for v in values:
                p = Point(kind, float(v), repair=repair)
                t0 = time.perf_counter()
                module = _fused(aligned, spec, splits, p)
                seconds[p.key] = time.perf_counter() - t0
                fused.append(row(module, splits, ens.macs, test=repair == "lsq", key=p.key, label=_label(p),
                                 kind="fused", point=p))
                if repair != "lsq":
                    modules[p.key] = module
                print(f"  {partition.describe()}, zoo seed {seed}: {_label(p)} {fused[-1].accuracy:.4f}, "
                      f"{seconds[p.key]:.0f} s", flush=True)
    field = Field(members, {"ensemble": ens}, subs + fused)
    cfg = distill_config(load_target("cpu-ort"))
    teacher = teacher_of(field, cfg)
    teacher_members = teacher.members or tuple(range(len(aligned)))
    picks = {p.key: p for b in BUDGETS for p in _picks(field, b)}
    shared: list = []
    distilled = []
    for p in picks.values():
        if p.kind == "member":
            student = copy.deepcopy(aligned[int(p.value)])
        else:
            student = _fused(aligned, spec, splits, p)
        distill(student, ensemble([aligned[i] for i in teacher_members], batched=True), splits.x_train, cfg,
                quiet=True, targets=shared)
        distilled.append(row(student, splits, ens.macs, key=p.key, label=_label(p),
                             kind=p.row_kind, point=p))
        print(f"  zoo seed {seed}: {_label(p)} {distilled[-1].accuracy:.4f}", flush=True)
    rows = members + [ens] + subs + fused + distilled
    choices = {}
    for b in BUDGETS:
        c = choose(rows, Budget(max_macs_ratio=b), ens)
        test = c.chosen.test or _test(modules[c.chosen.key], splits)
        choices[f"{b:g}"] = {"key": c.chosen.key, "label": c.chosen.label, "kind": c.chosen.kind,
                             "test_accuracy": test["accuracy"], "validation_accuracy": c.chosen.accuracy,
                             "reason": c.reason}
    return {"partition": partition.describe(), "seed": seed, "teacher": teacher.label,
            "rows": [{"key": r.key, "label": r.label, "kind": r.kind, "macs_ratio": r.macs / ens.macs,
                      "validation": r.accuracy, "test": r.test.get("accuracy"), "members": r.members} for r in rows],
            "fuse_seconds": seconds, "choices": choices}


def _picks(field: Field, budget: float) -> list[Point]:
    """What the export distils, cut to the benchmark's time: the most accurate member, and at the tightest budget
    the most accurate fused point within it (depth or alpha, on validation), where a distilled member is what a
    fused model must beat."""
    member, *fused = distill_picks(field, Budget(max_macs_ratio=budget))
    if budget != min(BUDGETS):
        return [member]
    rows = {c.key: c for c in field.others}
    ens_macs = field.exact["ensemble"].macs
    within = [p for p in fused if fits(rows[replace(p, distill=False).key], Budget(max_macs_ratio=budget), ens_macs)]
    return [member] + ([max(within, key=lambda p: rows[replace(p, distill=False).key].accuracy)] if within else [])


def _fused(aligned: list, spec, splits, p: Point) -> torch.nn.Module:
    """The aligned models fused at the point (a depth split or alpha), with its repair."""
    kw = {"depth": int(p.value)} if p.kind == "depth" else {"alpha": p.value}
    return ef.fuse(aligned, spec, data=splits.calib_batches, repair=p.repair, **kw)


def _label(p: Point) -> str:
    what = f"depth {int(p.value)}" if p.kind == "depth" else f"alpha {p.value:g}" if p.kind == "alpha" else "member"
    if p.kind == "member":
        return "best member distilled"
    return f"{what}, {p.repair or 'no repair'}" + (" + distill" if p.distill else "")


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def tables(results: dict[str, list[dict]]) -> str:
    """One table of test accuracy per regime (members as their range; other rows by label, mean ± std over the
    zoos) and one table of what ships."""
    out = []
    for regime, zoos in results.items():
        out += [f"### {regime}", "", "| candidate | MACs / ens | validation accuracy | test accuracy |",
                "|---|---|---|---|"]
        member_tests = [[r["test"] for r in z["rows"] if r["kind"] == "member"] for z in zoos]
        member_vals = [[r["validation"] for r in z["rows"] if r["kind"] == "member"] for z in zoos]
        out.append(f"| members (range, mean of zoos) | 0.25 | {np.mean([min(t) for t in member_vals]):.4f} – "
                   f"{np.mean([max(t) for t in member_vals]):.4f} | {np.mean([min(t) for t in member_tests]):.4f} – "
                   f"{np.mean([max(t) for t in member_tests]):.4f} |")
        labels = {}
        for z in zoos:
            for r in z["rows"]:
                if r["kind"] != "member":
                    labels.setdefault(r["label"], []).append(r)
        for label, rs in labels.items():
            tests = [r["test"] for r in rs if r["test"] is not None]
            out.append(f"| {label}{'' if len(rs) == len(zoos) else f' ({len(rs)} of {len(zoos)} zoos)'} | "
                       f"{np.mean([r['macs_ratio'] for r in rs]):.2f} | {_mean_std([r['validation'] for r in rs])} | "
                       f"{_mean_std(tests) if tests else '–'} |")
        out += ["", "| budget (MACs / ens) | shipped, per zoo | test accuracy of what ships |", "|---|---|---|"]
        for b in BUDGETS:
            picks = [z["choices"][f"{b:g}"] for z in zoos]
            out.append(f"| ≤ {b:g} | {'; '.join(p['label'] for p in picks)} | "
                       f"{_mean_std([p['test_accuracy'] for p in picks])} |")
        out.append("")
    return "\n".join(out)


def run(seeds: int = 3, threads: int = 1, regimes: list[str] | None = None,
        zoo_seeds: list[int] | None = None) -> dict:
    """Every zoo (stored ones are read back), then the tables; returns the results by regime."""
    set_threads(threads)
    store = OUT / "regimes"
    results = {}
    for regime in regimes or list(REGIMES):
        partition = REGIMES[regime]
        results[regime] = []
        for seed in range(seeds):
            if zoo_seeds and seed not in zoo_seeds:
                continue
            def measured() -> dict:
                t0 = time.perf_counter()
                return measure_zoo(partition, seed) | {"torch_threads": threads,
                                                        "seconds": round(time.perf_counter() - t0, 1)}

            result = resumed(store / f"{partition.kind}{partition.value:g}-s{seed}.json", measured)
            print(f"{regime}, zoo seed {seed}: " + "; ".join(f"≤ {b}: {c['label']} ({c['test_accuracy']:.4f})"
                                                             for b, c in result["choices"].items()), flush=True)
            results[regime].append(result)
    text = tables(results)
    atomic_write_text(OUT / "regimes.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(OUT / "regimes.md", text + "\n")
    print(text)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--zoo-seed", type=int, action="append", help="measure only these zoo seeds (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--regime", choices=list(REGIMES), action="append", help="only these (default: all)")
    args = ap.parse_args()
    run(args.seeds, args.threads, args.regime, args.zoo_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
