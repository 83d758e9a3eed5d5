"""Fused vs ensemble vs single models on the same data, in the same run: accuracy, NLL, cost and latency."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .files import atomic_write_text
from .metrics import macs, params
from .runtime import OrtRunner, Runner, TorchRunner, latency, latency_batch, predict


def scores(logits: np.ndarray, labels: torch.Tensor, bins: int = 15) -> dict:
    """Accuracy, mean negative log-likelihood of log-softmax(logits), and expected calibration error (15 equal-width
    confidence bins): fused models can be as accurate yet over-confident."""
    t = torch.from_numpy(logits).double()
    nll = torch.nn.functional.cross_entropy(t, labels).item()
    conf, pred = torch.softmax(t, 1).max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.double().mean() * (conf[inside].mean() - correct[inside].mean()).abs())
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": ece}


def measure(module: nn.Module, x: torch.Tensor, y: torch.Tensor, onnx_path: str | Path | None = None,
            batch_sizes: tuple[int, ...] = (1,), threads: int = 1, budget_s: float = 1.0,
            runner: Runner | None = None) -> dict:
    """One candidate's row: scores on (x, y) and latency, from `runner` when given, else the ONNX file when
    given, else PyTorch. MACs and parameters always come from `module`."""
    runner = runner or (OrtRunner(onnx_path, threads) if onnx_path else TorchRunner(module, threads))
    out = predict(runner, x)
    row = scores(out, y)
    row["predictions"] = out.argmax(1)
    row["macs"] = macs(module, x[:1])
    row["params"] = params(module)
    row["runtime"] = runner.name
    row["latency_by_batch"] = {}
    for b in batch_sizes:
        row["latency_by_batch"][str(b)] = latency(runner, latency_batch(x, b), budget_s=budget_s)
    row["latency_ms"] = row["latency_by_batch"][str(batch_sizes[0])]
    return row


def best_exact(rows: dict[str, dict]) -> dict[str, dict]:
    """Per batch size, the fastest exact ensemble (p50): the honest baseline a fused model must beat."""
    batches = rows["ensemble"]["latency_by_batch"]
    return {b: min(({"name": name, "p50": r["latency_by_batch"][b]["p50"]} for name, r in rows.items()),
                   key=lambda e: e["p50"]) for b in batches}


def agreement(row: dict, reference: dict) -> float:
    return float((row["predictions"] == reference["predictions"]).mean())


def public(row: dict) -> dict:
    """A row without the raw predictions and the module, for the JSON report."""
    return {k: v for k, v in row.items() if k not in ("predictions", "module")}


def mean_rows(rows: list[dict]) -> dict:
    """The `single` entry: accuracy and NLL averaged over the members, cost and latency of one member."""
    out = dict(public(rows[0]))
    out["accuracy"] = float(np.mean([r["accuracy"] for r in rows]))
    out["nll"] = float(np.mean([r["nll"] for r in rows]))
    out["ece"] = float(np.mean([r["ece"] for r in rows]))
    out["members"] = [{"accuracy": r["accuracy"], "nll": r["nll"], "ece": r["ece"]} for r in rows]
    return out


def markdown(report: dict) -> str:
    """The table a person reads: one row per candidate; MACs as ratios to the ensemble, latency as ratios to the
    fastest exact ensemble at that batch size, all measured in the same run."""
    ens = report["ensemble"]
    base = baseline(report)
    batches = list(ens["latency_by_batch"])
    head = ("| model | accuracy | NLL | ECE | agreement | MACs / ens | params | ONNX nodes | peak MB | " +
            " | ".join(f"p50 ms b{b} | / best ens" for b in batches) + " |")
    lines = [f"# edgefuse report: {report['target']}", "",
             f"{report['n_models']} × {report.get('arch', 'model')}, aligned by {report['align_method']} matching, "
             f"test set: {report['dataset']} ({report['n_test']} images). Latency: {ens['runtime']}, "
             f"{report['threads']} thread(s), p50 of repeated runs. Fused heads batched: "
             f"{'yes' if report.get('batched_heads') else 'no'}.", "",
             "Latency ratios are against the fastest exact ensemble at each batch size: " +
             ", ".join(f"b{b}: {e['name']} ({e['p50']:.3f} ms)" for b, e in base.items()) + ".", "",
             head, "|" + "---|" * (9 + 2 * len(batches))]

    def row(name: str, r: dict) -> str:
        cells = [name, f"{r['accuracy']:.4f}", f"{r['nll']:.4f}", f"{r['ece']:.4f}" if "ece" in r else "-",
                 f"{r['agreement']:.3f}" if "agreement" in r else "-", f"{r['macs'] / ens['macs']:.2f}",
                 f"{r['params']:,}", str(r.get("onnx_nodes", "-")),
                 f"{r['peak_memory_mb']:.1f}" if r.get("peak_memory_mb") is not None else "-"]
        for b in batches:
            p50 = r["latency_by_batch"][b]["p50"]
            cells += [f"{p50:.3f}", f"{p50 / base[b]['p50']:.2f}"]
        return "| " + " | ".join(cells) + " |"

    lines.append(row("single (mean of members)", report["single"]))
    for name, label in (("ensemble", "ensemble (members one after another, one graph)"),
                        ("ensemble_batched", "ensemble, batched (grouped kernels)"),
                        ("ensemble_sessions", f"ensemble, {report['n_models']} separate sessions")):
        if name in report:
            lines.append(row(label, report[name]))
    for c in report["candidates"][1:]:
        mark = " ← model.onnx" if c.get("key") == report["fused"].get("key") else ""
        lines.append(row(f"fused {c['label']}{mark}", c))
    if report["depth"] == 0:
        lines += ["", "No fused depth is faster than the best exact ensemble here, so model.onnx is the batched "
                  "exact ensemble: it is more accurate and at least as fast."]
    fused = report["fused"]
    if "onnx_nodes_unbatched" in fused:
        lines += ["", f"model.onnx has {fused['onnx_nodes']} ONNX nodes with batched heads, "
                  f"{fused['onnx_nodes_unbatched']} with the heads one after another."]
    if "naive_merge" in report:
        n = report["naive_merge"]
        lines += ["", f"Unaligned weight average (full merge, BN reset): accuracy {n['accuracy']:.4f}; "
                  f"aligned full merge: {_full_merge(report)['accuracy']:.4f}."]
    if "budget" in report:
        b = {k: v for k, v in report["budget"].items() if v is not None}
        lines += ["", f"Chosen within {', '.join(f'{k} = {v}' for k, v in b.items())}: {report['fused']['label']}."]
    if "parity" in report:
        lines += ["", f"ONNX vs PyTorch parity of model.onnx: max |diff| = {report['parity']['max_abs_diff']:.2e}."]
    lines += _device_lines(report)
    return "\n".join(lines) + "\n"


def _device_lines(report: dict) -> list[str]:
    """TensorRT targets: what was checked here, and what the device still has to do."""
    if "static_check" not in report:
        return []
    c = report["static_check"]
    lines = ["", "## TensorRT target", "",
             "Latencies above were measured on this machine with onnxruntime (CPU), a proxy for ranking candidates; "
             "the device's own latency comes from `bundle/deploy.py`.", "",
             f"Static check (TensorRT {c['tensorrt']}, operator table {c['table_version']}, opset {c['opset']}): "
             f"{'passes' if c['ok'] else 'FAILS'}; operators: " +
             ", ".join(f"{op}×{n}" for op, n in sorted(c["operators"].items())) + "."]
    lines += [f"- note: {n}" for n in c["notes"]]
    if c["dla_fallback"]:
        lines.append("- falls back from DLA to the GPU: " + ", ".join(c["dla_fallback"]))
    if "fp16" in report:
        f = report["fp16"]
        lines.append(f"- FP16 graph: accuracy {f['fp16_accuracy']:.4f} vs FP32 {f['fp32_accuracy']:.4f} "
                     f"(drop {f['accuracy_drop']:+.4f}), predictions agree on {f['prediction_agreement']:.4f}, "
                     f"max |logit diff| {f['max_abs_logit_diff']:.3g}.")
    if "bundle" in report:
        b = report["bundle"]["self_check_onnxruntime"]
        lines.append(f"- bundle/: self-check with onnxruntime in place of TensorRT "
                     f"{'passes' if b['ok'] else 'FAILS'} (batch {b['batch']}); copy it to the device and run "
                     "`python3 deploy.py` there.")
    return lines


def _full_merge(report: dict) -> dict:
    return next(c for c in report["candidates"] if c.get("depth") == report["max_depth"])


def baseline(report: dict) -> dict[str, dict]:
    """The report's per-batch baseline; reports from before the batched ensemble existed use the ensemble."""
    if "baseline_by_batch" in report:
        return report["baseline_by_batch"]
    return {b: {"name": "ensemble", "p50": e["p50"]} for b, e in report["ensemble"]["latency_by_batch"].items()}


def pareto_plot(report: dict, path: str | Path) -> Path:
    """Accuracy vs MACs and vs p50 latency: one point per depth, the ensemble, singles and the chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import save_figure

    ens, single, base = report["ensemble"], report["single"], baseline(report)
    b = next(iter(ens["latency_by_batch"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "macs", "MACs / ensemble"),
                           (axes[1], "p50", f"p50 latency / fastest exact ensemble (b{b})")):
        def x(r: dict) -> float:
            if key == "macs":
                return r["macs"] / ens["macs"]
            return r["latency_by_batch"][b]["p50"] / base[b]["p50"]
        depths = [c for c in report["candidates"][1:] if c.get("depth")]
        alphas = [c for c in report["candidates"][1:] if c.get("alpha") is not None]
        for cands, style, name, tag in ((depths, "o-", "fused, depth k", "depth"), (alphas, "v--", "fused, alpha",
                                                                                   "alpha")):
            if cands:
                ax.plot([x(c) for c in cands], [c["accuracy"] for c in cands], style, label=name)
            for c in cands:
                ax.annotate(f"{c[tag]:g}", (x(c), c["accuracy"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        chosen = report["fused"]
        ax.plot([x(chosen)], [chosen["accuracy"]], "*", ms=16, color="tab:red", label="chosen (model.onnx)")
        for name, marker in (("ensemble", "s"), ("ensemble_batched", "D"), ("ensemble_sessions", "P")):
            if name in report:
                ax.plot([x(report[name])], [report[name]["accuracy"]], marker, color="black", mfc="none"
                        if name != "ensemble" else "black", label=name.replace("_", ", "))
        ax.plot([x(single)], [single["accuracy"]], "^", color="tab:green", label="single (mean)")
        if "naive_merge" in report:
            ax.axhline(report["naive_merge"]["accuracy"], ls=":", color="gray", label="unaligned average")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"edgefuse: {report['n_models']} × {report.get('arch', 'model')} on {report['target']}")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {"json": atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n"),
            "md": atomic_write_text(out / "report.md", markdown(report)),
            "png": pareto_plot(report, out / "pareto.png")}


def verify(fused: nn.Module, models: list[nn.Module], data, target: str = "cpu-ort",
           out_dir: str | Path | None = None) -> dict:
    """Fused model vs the exact ensembles vs single members on the same labelled data (`(x, y)` or labelled
    batches), measured alike on the target's runtime; writes report.json/.md/pareto.png when `out_dir` is given."""
    import tempfile

    from .errors import EdgefuseError
    from .export import export_onnx, onnx_nodes
    from .pipeline import baselines
    from .runtime import peak_memory_mb
    from .targets import load_target

    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    else:
        pairs = [b for b in data if isinstance(b, (tuple, list)) and len(b) == 2]
        if not pairs:
            raise EdgefuseError("verify needs labelled data: (inputs, labels) or batches of them")
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    tgt = load_target(target)
    with tempfile.TemporaryDirectory() as tmp:
        members, exact = baselines(models, x, y, tgt, Path(tmp))
        path = export_onnx(fused, x[:2], Path(tmp) / "fused.onnx", opset=tgt.opset)
        row = measure(fused, x, y, path, batch_sizes=tgt.batch_sizes, threads=tgt.threads)
        row |= {"onnx_nodes": onnx_nodes(path), "peak_memory_mb": peak_memory_mb([path], max(tgt.batch_sizes)),
                "agreement": agreement(row, exact["ensemble"])}
    report = {"target": tgt.name, "n_models": len(models), "arch": type(models[0]).__name__, "depth": None,
              "alpha": None, "max_depth": None, "align_method": "given", "dataset": "given", "n_test": len(x),
              "threads": tgt.threads, "batch_sizes": list(tgt.batch_sizes), "single": mean_rows(members),
              **{k: public(r) for k, r in exact.items()}, "baseline_by_batch": best_exact(exact),
              "fused": public(row) | {"label": "fused", "key": "fused"},
              "candidates": [public(exact["ensemble"]) | {"label": "ensemble"},
                             public(row) | {"label": "fused", "key": "fused"}]}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_report(report, out_dir)
    return report
