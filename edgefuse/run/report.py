"""Rendering, from the JSON report alone: the Markdown table (one row per candidate, which one dominates it, why the
shipped one won), the Pareto plot, and the files written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from .baselines import best_exact, mean_of_members
from .candidate import Candidate
from .choose import Choice
from ..base.files import atomic_write_text, save_figure
from ..measure.runners import PASSES, PRECISION
from ..targets import DEFAULT_BINDS

DEVICE_NOTE = ("Latencies above were measured on this machine with onnxruntime (CPU), a proxy for ranking candidates; "
               "the device's own latency comes from `bundle/deploy.py`.")


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    """The table a person reads: validation accuracy (what the choice used), test scores (what is reported), MACs as
    ratios to the ensemble, p50 as ratios to the fastest exact ensemble at that batch size, all from one run."""
    ens, base = report["ensemble"], report["baseline_by_batch"]
    batches = list(ens["latency_by_batch"])
    binds = report["budget"].get("binds", DEFAULT_BINDS)
    head = ("| model | kind | val acc | test acc | NLL | ECE | AUROC softmax / heads | agreement | MACs / ens | params "
            "| peak MB | " +
            " | ".join(f"{'p99' if binds == 'p99' else 'ms'} b{b} | / best ens" for b in batches) +
            " | p50 / MACs vs a member | dominated by |")
    shipped = report["shipped"]
    lines = [f"# edgefuse report: {report['target']}", "",
             f"{report['n_models']} × {report.get('arch', 'model')}, {_regime(report)}. "
             f"Chosen on {report['validation_data']}; test scores on {report['test_data']}, never used to choose. "
             f"Latency: {ens['runtime']}, {report['threads']} thread(s), per call, "
             + ("the p99" if binds == "p99" else "the expected cost")
             + f" over the test inputs in order, each call's median over {PASSES} passes ({PASSES - 1} where one more "
             f"could not move p50 or the mean by {PRECISION:.0%})"
             + " (the figure the budget binds); ratios against the "
             "fastest exact ensemble at each batch size: " +
             ", ".join(f"b{b}: {e['name']} ({_stat(e, binds):.3f} ms)" for b, e in base.items()) + ".", ""]
    if report.get("distillation"):
        d = report["distillation"]
        teacher = f", towards {d['teacher']} (the ensemble most accurate on validation)" if d.get("teacher") else ""
        lines += [f"Distilled candidates: {d['config']} on the training split's unlabeled images{teacher} "
                  f"({d['why']}).", ""]
    lines += [head, "|" + "---|" * (13 + 2 * len(batches))]
    for c in report["candidates"]:
        name = c["label"] + (" **← model.onnx**" if c["key"] == shipped["key"] else "")
        cells = [name, c["kind"], f"{c['validation']['accuracy']:.4f}", f"{c['test']['accuracy']:.4f}",
                 f"{c['test']['nll']:.4f}", f"{c['test']['ece']:.4f}",
                 f"{_num(c['test'].get('auroc'), '.3f')} / {_num(c['test'].get('heads_auroc'), '.3f')}",
                 _num(c.get("agreement"), ".3f"),
                 f"{c['macs'] / ens['macs']:.2f}", f"{c['params']:,}", _num(c.get("peak_memory_mb"), ".1f")]
        for b in batches:
            t = _stat(c["latency_by_batch"][b], binds)
            cells += [f"{t:.3f}", f"{t / _stat(base[b], binds):.2f}"]
        cells.append(" / ".join(f"{v:.2f}" for v in c["latency_per_mac"].values()) if "latency_per_mac" in c else "-")
        cells.append(_label_of(report, c.get("dominated_by")) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    single = report["single"]
    lines += ["", f"Mean member: validation {single['validation']['accuracy']:.4f}, test "
              f"{single['test']['accuracy']:.4f}; exact ensemble: validation {ens['validation']['accuracy']:.4f}, "
              f"test {ens['test']['accuracy']:.4f}.", "",
              f"**Shipped: {shipped['label']}** ({shipped['kind']}, test accuracy "
              f"{report['fused']['accuracy']:.4f}) — "
              f"{shipped['reason']}."]
    if shipped.get("cascade"):
        esc = shipped["cascade"]["escalated"]
        lines += ["", f"model.onnx is the whole cascade as one graph (onnxruntime runs its second stage only when an "
                  f"input of the call escalates, on those rows only); `cascade/` holds its two stage graphs and "
                  f"`cascade.json`, for `ef.Cascade.load` or one engine per stage on a device. It escalated "
                  f"{esc['validation']:.1%} of validation and {esc['test']:.1%} of test inputs."]
    if shipped.get("uncertainty"):
        u = shipped["uncertainty"]
        lines += ["", f"Inputs not to trust (uncertainty.json): flag when {u['signal'].replace('_', ' ')} is "
                  f"{u['flag_when']} {u['threshold']:.4g} (threshold chosen on validation); on test it flags "
                  f"{u['test']['flagged']:.1%} of the inputs and catches {_num(u['test']['errors_flagged'], '.1%')} "
                  f"of the errors, accuracy on the rest {_num(u['test']['kept_accuracy'], '.4f')}."]
    lines += _cascade_lines(report, batches)
    if report.get("pruned"):
        lines += ["", "Not built (`--all-points` builds them): " + "; ".join(
            f"{p['label']}, {p['why']}" for p in report["pruned"]) + "."]
    if "naive_merge" in report:
        lines += ["", "Unaligned weight average (full merge, BatchNorm statistics reset where there are any): test "
                  f"accuracy {report['naive_merge']['accuracy']:.4f}."]
    if "onnx_nodes_unbatched" in report["fused"]:
        lines += ["", f"model.onnx has {report['fused']['onnx_nodes']} ONNX nodes with batched heads, "
                  f"{report['fused']['onnx_nodes_unbatched']} with the heads one after another."]
    if "parity" in report:
        lines += ["", f"ONNX vs PyTorch parity of model.onnx: max |diff| = {report['parity']['max_abs_diff']:.2e}."]
    return "\n".join(lines + _device_lines(report)) + "\n"


def _stat(lat: dict, binds: str) -> float:
    """The figure a budget binds from a latency entry: its mean (its p50 where no mean was recorded) or its p99."""
    return lat["p99"] if binds == "p99" else lat.get("expected", lat["p50"])


def _cascade_lines(report: dict, batches: list[str]) -> list[str]:
    """The cascade rows' own figures: escalation on both splits, mean and worst MACs, mean / p50 / p99 per call."""
    rows = [c for c in report["candidates"] if c["kind"] == "cascade"]
    if not rows:
        return []
    ens_macs = report["ensemble"]["macs"]
    lines = ["", "## Cascades", "",
             "The first stage runs on every input; the rest of the ensemble only where the gate score is below the "
             "threshold (both chosen on validation). Latency per call over the test inputs in order.", "",
             "| cascade | combine | escalated val / test | MACs mean / worst | " +
             " | ".join(f"b{b} mean / p50 / p99 ms (calls escalated)" for b in batches) + " |",
             "|---|---|---|---|" + "---|" * len(batches)]
    for c in rows:
        k = c["cascade"]
        cells = [c["label"], k["combine"], f"{k['escalated']['validation']:.1%} / {k['escalated']['test']:.1%}"
                 + (" (shifted)" if k["shifted"] else ""),
                 f"{c['macs'] / ens_macs:.2f} / {k['macs_worst'] / ens_macs:.2f}"]
        for b in batches:
            lat = c["latency_by_batch"][b]
            cells.append(f"{lat['mean']:.3f} / {lat['p50']:.3f} / {lat['p99']:.3f} "
                         f"({k['calls_escalated'][b]:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _label_of(report: dict, key: str | None) -> str | None:
    return next((c["label"] for c in report["candidates"] if c["key"] == key), key) if key else None


def _device_lines(report: dict) -> list[str]:
    """TensorRT targets: what was checked here, and what the device still has to do."""
    if "static_check" not in report:
        return []
    c = report["static_check"]
    lines = ["", "## TensorRT target", "", DEVICE_NOTE, "",
             f"Static check (TensorRT {c['tensorrt']}, operator table {c['table_version']}, opset {c['opset']}): "
             f"{'passes' if c['ok'] else 'FAILS'}; operators: " +
             ", ".join(f"{op}×{n}" for op, n in sorted(c["operators"].items())) + "."]
    lines += [f"- note: {n}" for n in c["notes"]]
    if c["dla_fallback"]:
        lines.append("- falls back from DLA to the GPU: " + ", ".join(c["dla_fallback"]))
    if "fp16" in report:
        f = report["fp16"]
        lines.append(f"- FP16 graph: test accuracy {f['fp16_accuracy']:.4f} vs FP32 {f['fp32_accuracy']:.4f} "
                     f"(drop {f['accuracy_drop']:+.4f}), predictions agree on {f['prediction_agreement']:.4f}, "
                     f"max |logit diff| {f['max_abs_logit_diff']:.3g}.")
    if "bundle" in report:
        b = report["bundle"]["self_check_onnxruntime"]
        lines.append(f"- bundle/: self-check with onnxruntime in place of TensorRT "
                     f"{'passes' if b['ok'] else 'FAILS'} (batch {b['batch']}); copy it to the device and run "
                     "`python3 deploy.py` there.")
    if "device_choice" in report:
        d = report["device_choice"]
        lines += ["", "### The device decides", "",
                  f"The shipped model above was chosen here with the MACs share standing in for the device's latency. "
                  f"These {len(d['candidates'])} candidates (none beaten on validation accuracy at no higher MACs) "
                  "went to the device in `bundle/candidates/`; `python3 deploy.py --choose` there builds and times "
                  "each and ships the most accurate within the target's latency and memory budgets "
                  "(`choice.json`, `model.engine`).", "",
                  "| candidate | graph | val acc | test acc | MACs / ens |", "|---|---|---|---|---|"]
        ens_macs = report["ensemble"]["macs"]
        lines += [f"| {c['label']}{' (shipped here)' if c['key'] == d['host_choice'] else ''} | {c['graph']} | "
                  f"{c['validation_accuracy']:.4f} | {c['test_accuracy']:.4f} | {c['macs'] / ens_macs:.2f} |"
                  for c in d["candidates"]]
    return lines


def _regime(report: dict) -> str:
    """How the members relate and how they were aligned, in words."""
    regime = report.get("regime")
    aligned = f"aligned by {report['align_method']} matching"
    if not regime:
        return aligned
    skipped = "alignment skipped" in regime["why"]
    return f"{regime['name']} ({regime['why']})" + ("" if skipped else f", {aligned}")


MARKERS = {"member": ("^", "tab:green"), "distilled member": ("P", "tab:purple"), "sub-ensemble": ("D", "tab:orange"),
           "ensemble": ("s", "black"), "cascade": ("X", "tab:brown"), "merge": ("h", "tab:cyan")}


def pareto_plot(report: dict, path: str | Path) -> Path:
    """Validation accuracy vs MACs and vs p50 latency: fused depths and alphas as curves, members, the distilled
    member and the exact ensembles as markers, the shipped model starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ens, base = report["ensemble"], report["baseline_by_batch"]
    b = next(iter(ens["latency_by_batch"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "macs", "MACs / ensemble"),
                           (axes[1], "latency", f"latency / fastest exact ensemble (b{b})")):
        def x(r: dict) -> float:
            binds = report["budget"].get("binds", DEFAULT_BINDS)
            return (r["macs"] / ens["macs"] if key == "macs"
                    else _stat(r["latency_by_batch"][b], binds) / _stat(base[b], binds))

        def acc(r: dict) -> float:
            return r["validation"]["accuracy"]
        for tag, style, name in (("depth", "o-", "fused, depth k"), ("alpha", "v--", "fused, alpha")):
            for distilled in (False, True):
                cands = [c for c in report["candidates"] if c["kind"] == "fused" and c.get(tag) is not None
                         and (c["point"] or {}).get("distill", False) == distilled and c["precision"] == "fp32"]
                if cands:
                    ax.plot([x(c) for c in cands], [acc(c) for c in cands], style, alpha=1 if distilled else 0.5,
                            label=name + (" + distill" if distilled else ""))
                for c in cands:
                    ax.annotate(f"{c[tag]:g}", (x(c), acc(c)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for kind, (marker, color) in MARKERS.items():
            rows = [c for c in report["candidates"] if c["kind"] == kind and c["precision"] == "fp32"]
            if rows:
                ax.plot([x(c) for c in rows], [acc(c) for c in rows], marker, color=color, mfc="none", label=kind)
        int8 = [c for c in report["candidates"] if c["precision"] == "int8"]
        if int8:
            ax.plot([x(c) for c in int8], [acc(c) for c in int8], "x", color="tab:gray", label="INT8 (any kind)")
        chosen = next(c for c in report["candidates"] if c["key"] == report["shipped"]["key"])
        ax.plot([x(chosen)], [acc(chosen)], "*", ms=16, color="tab:red", label="shipped (model.onnx)")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"edgefuse: {report['n_models']} × {report.get('arch', 'model')} on {report['target']}")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(report: dict, out_dir: str | Path, name: str = "report") -> dict[str, Path]:
    """report.json (strict JSON: a NaN is an error, not a token other readers reject), report.md, pareto.png."""
    out = Path(out_dir)
    return {"json": atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2, allow_nan=False) + "\n"),
            "md": atomic_write_text(out / f"{name}.md", markdown(report)),
            "png": pareto_plot(report, out / "pareto.png")}


def latency_per_mac(c: Candidate, members: list[Candidate]) -> dict[str, float]:
    """Per batch size, the row's p50 over the fastest member's, divided by its MACs over a member's (a cascade's
    mean): 1 where a graph runs as fast as its arithmetic says, above 1 where its graph costs more than its MACs
    (many small kernels, dense blocks of a sparse layout, a call's fixed overhead)."""
    out = {}
    for b in c.latency_by_batch:
        ref = min(members, key=lambda m: m.p50(b))
        out[b] = round((c.p50(b) / ref.p50(b)) / (c.cost_macs() / ref.macs), 3)
    return out


def build_report(head: dict, members: list[Candidate], exact: dict[str, Candidate], others: list[Candidate],
                 choice: Choice, root: Path) -> dict:
    """The JSON report: `head` (target, data, alignment), every candidate with both splits' scores and who dominates
    it, the contract's entries (`single`, the exact ensembles, `fused` = the shipped row), and the choice's reason.
    Files are named relative to `root`, the folder the report is written to."""
    def row(c: Candidate) -> dict:
        return c.to_json(root) | {"dominated_by": choice.dominated_by.get(c.key),
                                  "within_budget": c.key in choice.within_budget,
                                  "latency_per_mac": latency_per_mac(c, members)}

    rows = members + list(exact.values()) + others
    chosen = choice.chosen
    report = head | {
        "depth": chosen.depth, "alpha": chosen.alpha,
        "shipped": {"key": chosen.key, "label": chosen.label, "kind": chosen.kind, "reason": choice.reason,
                    "uncertainty": chosen.uncertainty},
        "single": mean_of_members(members), **{name: row(c) for name, c in exact.items()},
        "baseline_by_batch": best_exact(exact), "fused": row(chosen),
        "candidates": [row(c) for c in rows]}
    distilled = [c for c in others if c.kind == "distilled member"]
    if distilled:
        report["distilled_member"] = row(distilled[0])
    return report
