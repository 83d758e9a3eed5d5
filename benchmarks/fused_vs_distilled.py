"""Fused models against the distilled member at the same distillation budget (`make bench`, or run alone).

Per zoo and per MACs budget (≤ 0.30, ≤ 0.50, ≤ 0.60 of the ensemble): the member most accurate on validation,
distilled; the widest fused depth under the budget (the shallowest cut that fits), distilled towards the ensemble's
mean and, Hydra-style, each head also towards its own member; the widest alpha under the budget, distilled; and the
exact ensemble. Every distillation uses the cpu-ort target's budget, 3 seeds each; test accuracy, NLL, ECE and
misclassification-detection AUROC (max softmax; heads' mutual information where there are heads) as mean ± std.
Levers (BatchNorm updated, temperature 4, learning rate 3e-3, REPAIR before distillation) are tried on the depth
point under 0.30 of the default zoo. Choices between variants are made on validation, never on test.

Writes build/bench/fused_vs_distilled.json and prints one table per zoo with the verdict per budget. Each finished
row is kept in build/bench/fused_vs_distilled/ (by zoo, label and distillation budget), so a stopped run resumes."""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.run.field import distill_config
from edgefuse.base.files import atomic_write_text
from edgefuse.fuse import distill
from edgefuse.measure.metrics import scores
from edgefuse.targets import load_target

BUDGETS = (0.30, 0.50, 0.60)
SEEDS = tuple(range(int(os.environ.get("BENCH_SEEDS", "3"))))
ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
# The default zoo (make export's), and one whose ensemble gains more: narrow members (width 4, 2 epochs).
ZOOS = {"default": {"width": 16, "epochs": 2}, "larger gain": {"width": 4, "epochs": 2}}
LEVERS = {"BN updated": {"bn_train": True}, "T = 4": {"temperature": 4.0}, "lr 3e-3": {"lr": 3e-3}}
NOISE = 2.0  # a difference beyond twice the larger standard deviation is beyond noise


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            o = model.eval()(x[i:i + 1000])
            outs.append(o if isinstance(o, tuple) else (o,))
    logits = torch.cat([o[0] for o in outs]).numpy()
    return logits, torch.cat([o[1] for o in outs]).numpy() if len(outs[0]) > 1 else None


def evaluate(model: torch.nn.Module, splits) -> dict:
    """Validation and test scores, the heads' AUROC where the model outputs its heads."""
    out = {}
    for name, x, y in (("validation", splits.x_val, splits.y_val), ("test", splits.x_test, splits.y_test)):
        logits, heads = _outputs(model, x)
        out[name] = scores(logits, y, head_logits=heads)
    return out


def _summary(runs: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1) of every score over the seeds."""
    out = {}
    for split in ("validation", "test"):
        for k in runs[0][split]:
            values = [r[split][k] for r in runs if r[split][k] is not None]
            if values:
                out[f"{split}_{k}"] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return out


def _points(aligned, spec, splits, ens_macs: int) -> dict[float, dict]:
    """Per budget: the shallowest depth and the largest alpha whose MACs fit (most capacity under the budget)."""
    x = splits.x_test[:1]
    depths = {d: ef.macs(ef.fuse(aligned, spec, depth=d, data=splits.calib_batches), x) / ens_macs
              for d in range(1, len(spec.cut_points) + 1)}
    alphas = {a: ef.macs(ef.fuse(aligned, spec, alpha=a, data=splits.calib_batches), x) / ens_macs for a in ALPHAS}
    out = {}
    for b in BUDGETS:
        d = min((d for d, r in depths.items() if r <= b), default=None)
        a = max((a for a, r in alphas.items() if r <= b), default=None)
        out[b] = {"depth": d, "depth_macs": depths.get(d), "alpha": a, "alpha_macs": alphas.get(a)}
    return out


def run_zoo(name: str, width: int, epochs: int, console: Console, levers: bool, store: Path) -> dict:
    models, _ = zoo.zoo_models("cnn", 4, width=width, epochs=epochs, quiet=True)
    splits = data.load_dataset("fashion-mnist")
    cfg = distill_config(load_target("cpu-ort"))
    spec = ef.permutation_spec(models[0], splits.x_test[:2])
    aligned = ef.align(models, spec)
    teacher = ef.ensemble(aligned, batched=True, head_outputs=True)
    ens_macs = ef.macs(teacher, splits.x_test[:1])
    members = [evaluate(m, splits) for m in aligned]
    best = max(range(len(aligned)), key=lambda i: members[i]["validation"]["accuracy"])
    points = _points(aligned, spec, splits, ens_macs)
    console.log(f"{name}: points per budget {points}")
    seconds: list[float] = []

    def distilled(label: str, make, **changes) -> dict:
        saved = store / f"{name}-{label}-{'-'.join(f'{k}={v}' for k, v in changes.items())}-{len(SEEDS)}.json"
        if saved.is_file() and json.loads(saved.read_text())["distillation"] == cfg.describe():
            return json.loads(saved.read_text())["summary"]
        runs = []
        for seed in SEEDS:
            start = time.perf_counter()
            student = distill(make(), teacher, splits.x_train, replace(cfg, seed=seed, **changes), label=label,
                              quiet=True)
            seconds.append(time.perf_counter() - start)
            runs.append(evaluate(student, splits))
        s = _summary(runs)
        console.log(f"{name} {label}: test {s['test_accuracy'][0]:.4f} ± {s['test_accuracy'][1]:.4f}, "
                    f"{seconds[-1]:.0f} s per distillation")
        atomic_write_text(saved, json.dumps({"distillation": cfg.describe(), "summary": s}))
        return s

    def fused(**kw):
        return lambda: ef.fuse(aligned, spec, data=splits.calib_batches, **kw)

    rows = {"ensemble": _summary([evaluate(teacher, splits)] * 2),
            "mean member": {k: (float(np.mean([m[k.split("_")[0]][k.split("_", 1)[1]] for m in members])), 0.0)
                            for k in ("test_accuracy", "test_nll", "test_ece", "test_auroc")},
            f"member {best} distilled": distilled(f"member {best}", lambda: copy.deepcopy(aligned[best]))}
    for p in points.values():
        d, a = p["depth"], p["alpha"]
        if d is not None and f"depth {d} + distill" not in rows:
            rows[f"depth {d} + distill"] = distilled(f"depth {d}", fused(depth=d, head_outputs=True))
            rows[f"depth {d} + per-head distill"] = distilled(f"depth {d} per head", fused(depth=d, head_outputs=True),
                                                             per_head=True)
        if a is not None and f"alpha {a:g} + distill" not in rows:
            rows[f"alpha {a:g} + distill"] = distilled(f"alpha {a:g}", fused(alpha=a))
    lever_rows = {}
    if levers and points[BUDGETS[0]]["depth"] is not None:
        d = points[BUDGETS[0]]["depth"]
        for lever, changes in LEVERS.items():
            lever_rows[f"depth {d} + distill, {lever}"] = distilled(f"depth {d} {lever}", fused(depth=d,
                                                                    head_outputs=True), **changes)
        lever_rows[f"depth {d} + distill, REPAIR first"] = distilled(
            f"depth {d} REPAIR", fused(depth=d, head_outputs=True, repair="repair"))
    return {"zoo": {"arch": "cnn", "width": width, "epochs": epochs, "n": 4}, "distillation": cfg.describe(),
            "points": {str(b): p for b, p in points.items()}, "rows": rows, "levers": lever_rows,
            "verdicts": verdicts(rows, points, best), "seconds_per_distillation": float(np.mean(seconds)) if seconds else None}


def _beyond(a: tuple[float, float], b: tuple[float, float]) -> str:
    diff = a[0] - b[0]
    noise = NOISE * max(a[1], b[1])
    return ("better" if diff > 0 else "worse") if abs(diff) > noise else "tie"


def verdicts(rows: dict, points: dict, best: int) -> dict:
    """Per budget: the fused variant most accurate on validation against the distilled member, on test accuracy
    and on misclassification-detection AUROC (its better signal against the member's max softmax)."""
    member = rows[f"member {best} distilled"]
    out = {}
    for b, p in points.items():
        names = [n for n in rows if (p["depth"] is not None and n.startswith(f"depth {p['depth']} "))
                 or (p["alpha"] is not None and n == f"alpha {p['alpha']:g} + distill")]
        if not names:
            continue
        pick = max(names, key=lambda n: rows[n]["validation_accuracy"][0])
        r = rows[pick]
        auroc = max((r[k] for k in ("test_auroc", "test_heads_auroc") if k in r), key=lambda v: v[0])
        out[str(b)] = {"fused": pick, "accuracy": _beyond(r["test_accuracy"], member["test_accuracy"]),
                       "accuracy_diff": r["test_accuracy"][0] - member["test_accuracy"][0],
                       "auroc": _beyond(auroc, member["test_auroc"]), "auroc_diff": auroc[0] - member["test_auroc"][0]}
    return out


def _cell(v: tuple[float, float] | None, fmt: str = ".4f") -> str:
    return "-" if v is None else f"{v[0]:{fmt}} ± {v[1]:{fmt}}"


def show(name: str, result: dict, console: Console) -> None:
    rows = result["rows"] | result["levers"]
    ens, single = rows["ensemble"]["test_accuracy"][0], rows["mean member"]["test_accuracy"][0]
    table = Table(title=f"{name} zoo (cnn width {result['zoo']['width']}, {result['zoo']['epochs']} epochs): mean member "
                        f"{single:.4f} → ensemble {ens:.4f}; {result['distillation']}, seeds {list(SEEDS)}")
    for col in ("candidate", "test acc", "kept", "NLL", "ECE", "AUROC softmax", "AUROC heads"):
        table.add_column(col, justify="right")
    for label, r in rows.items():
        acc = r["test_accuracy"]
        kept = (acc[0] - single) / (ens - single) if ens > single else float("nan")
        table.add_row(label, _cell(acc), f"{kept:.2f}", _cell(r.get("test_nll")), _cell(r.get("test_ece")),
                      _cell(r.get("test_auroc"), ".3f"), _cell(r.get("test_heads_auroc"), ".3f"))
    console.print(table)
    for b, v in result["verdicts"].items():
        console.print(f"MACs ≤ {b}: {v['fused']} vs the distilled member — accuracy {v['accuracy']} "
                      f"({v['accuracy_diff']:+.4f}), AUROC {v['auroc']} ({v['auroc_diff']:+.3f})")


def main(out_root: Path = Path("build/bench")) -> dict:
    console = Console(width=160)
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name, z in ZOOS.items():  # the main rows of every zoo first, the levers last: they matter least
        results[name] = run_zoo(name, z["width"], z["epochs"], console, False, out_root / "fused_vs_distilled")
    first = next(iter(ZOOS))
    results[first] = run_zoo(first, ZOOS[first]["width"], ZOOS[first]["epochs"], console, True,
                             out_root / "fused_vs_distilled")
    for name, result in results.items():
        show(name, result, console)
    atomic_write_text(out_root / "fused_vs_distilled.json", json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
