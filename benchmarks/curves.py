"""Fusion curves for `make bench`: accuracy and MACs at every depth and alpha, with and without repair, on the zoo
(Fashion-MNIST, N=4), against the mean single model, the member distilled towards the ensemble, and the ensemble;
the same distillation at the point under half the ensemble's MACs that is most accurate on validation. Accuracy is
from PyTorch on the 10k test images; cost from ef.macs."""
from __future__ import annotations

from pathlib import Path

import copy

import torch
from rich.console import Console
from rich.table import Table

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.base.files import save_figure
from edgefuse.fuse import DistillConfig, distill

ALPHAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
# Fewer distillation steps for ResNet-20: its whole curve already takes about 50 minutes on 2 cores.
DISTILL_STEPS = {"cnn": 500, "resnet20": 300}  # cnn: the cpu-ort target's budget
# Weight matching fails on the narrow residual net (full merge of 2 models: 0.16 against 0.66 with activation
# matching), so its curve uses activation matching on the calibration images.
ALIGN_METHOD = {"resnet20": "activation"}
REPAIRS = (None, "bn", "repair")


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model.eval()(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).double().mean())


def curves(arch: str, console: Console, out_dir: Path, distill_steps: int | None = None) -> dict:
    distill_steps = distill_steps or DISTILL_STEPS.get(arch, 600)
    models, _ = zoo.zoo_models(arch, 4, quiet=True)
    splits = data.load_dataset("fashion-mnist")
    x, y = splits.x_test, splits.y_test
    calib_batches = splits.calib_batches
    cfg = DistillConfig(steps=distill_steps)
    spec = ef.permutation_spec(models[0], x[:2])
    method = ALIGN_METHOD.get(arch, "weight")
    aligned = ef.align(models, spec, method=method, data=calib_batches if method == "activation" else None)
    ens_macs = ef.macs(ef.ensemble(aligned), x)
    teacher = ef.ensemble(aligned)
    ens_acc = _accuracy(teacher, x, y)
    single = sum(_accuracy(m, x, y) for m in models) / len(models)
    member = distill(copy.deepcopy(models[0]), teacher, splits.x_train, cfg, label="member 0")
    distilled_member = _accuracy(member, x, y)
    console.log(f"{arch} member 0 distilled: {_accuracy(models[0], x, y):.4f} -> {distilled_member:.4f}")
    points = [("depth", k) for k in range(1, len(spec.cut_points) + 1)] + [("alpha", a) for a in ALPHAS]
    rows = []
    for kind, value in points:
        row = {"kind": kind, "value": value}
        for repair in REPAIRS:
            fused = ef.fuse(aligned, spec, data=calib_batches, repair=repair, **{kind: value})
            row[str(repair)] = _accuracy(fused, x, y)
        row["macs_ratio"] = ef.macs(fused, x) / ens_macs
        row["val_bn"] = _accuracy(ef.fuse(aligned, spec, data=calib_batches, **{kind: value}), splits.x_val,
                                  splits.y_val)
        rows.append(row)
        console.log(f"{arch} {kind} {value:g}: MACs {row['macs_ratio']:.2f}, " +
                    ", ".join(f"{p}: {row[str(p)]:.4f}" for p in REPAIRS))
    for kind in ("depth", "alpha"):  # distillation at the point under 50 % MACs most accurate on validation
        under = [r for r in rows if r["kind"] == kind and r["macs_ratio"] <= 0.5] or \
            [min((r for r in rows if r["kind"] == kind), key=lambda r: r["macs_ratio"])]
        best = max(under, key=lambda r: r["val_bn"])
        fused = ef.fuse(aligned, spec, data=calib_batches, **{kind: best["value"]})
        best["distill"] = _accuracy(distill(fused, teacher, splits.x_train, cfg, label=f"{kind} {best['value']:g}"),
                                    x, y)
        console.log(f"{arch} {kind} {best['value']:g} distilled {distill_steps} steps: {best['distill']:.4f}")
    gain = ens_acc - single
    at_half = [max(v for k, v in r.items() if k in ("None", "bn", "repair", "distill")) for r in rows
               if r["macs_ratio"] <= 0.5]
    kept = (max(at_half) - single) / gain if at_half and gain > 0 else float("nan")
    table = Table(title=f"{arch} × 4, {method} matching: test accuracy by fusion point (single {single:.4f}, "
                        f"member 0 distilled {distilled_member:.4f}, ensemble {ens_acc:.4f}; gain kept at ≤ 50 % "
                        f"MACs: {kept:.0%}; distillation: {cfg.describe()})")
    for col in ("point", "MACs / ens", "no repair", "bn", "REPAIR", "distill"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['kind']} {r['value']:g}", f"{r['macs_ratio']:.2f}",
                      *(f"{r[str(p)]:.4f}" for p in REPAIRS), f"{r['distill']:.4f}" if "distill" in r else "-")
    console.print(table)
    _plot(arch, rows, single, ens_acc, distilled_member, out_dir / f"curves_{arch}.png")
    return {"align_method": method, "single_accuracy": single, "ensemble_accuracy": ens_acc,
            "distilled_member_accuracy": distilled_member, "gain_kept_at_half_macs": kept,
            "distill": cfg.describe(), "rows": rows}


def _plot(arch: str, rows: list[dict], single: float, ens: float, distilled_member: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("depth", "o"), ("alpha", "v")):
        pts = [r for r in rows if r["kind"] == kind]
        for repair, style in (("None", ":"), ("bn", "-"), ("repair", "--")):
            ax.plot([r["macs_ratio"] for r in pts], [r[repair] for r in pts], marker + style,
                    label=f"{kind}, {'no repair' if repair == 'None' else repair}", ms=4)
        ax.plot([r["macs_ratio"] for r in pts if "distill" in r], [r["distill"] for r in pts if "distill" in r],
                marker, ms=11, mfc="none", color="tab:red", label=f"{kind}, distilled")
    ax.axhline(ens, color="black", label="ensemble")
    ax.axhline(single, color="tab:green", ls="--", label="single (mean)")
    ax.axhline(distilled_member, color="tab:purple", ls="-.", label="member 0 distilled")
    ax.axvline(0.5, color="gray", ls=":")
    ax.set_xlabel("MACs / ensemble")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"edgefuse: {arch} × 4 on Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    import json
    import sys

    from edgefuse.base.files import atomic_write_text

    out = Path("build/bench")
    for name in sys.argv[1:] or ("cnn", "resnet20"):
        result = curves(name, Console(width=160), out)
        atomic_write_text(out / f"curves_{name}.json", json.dumps(result, indent=2) + "\n")
