"""The honest baselines: each member, the exact ensemble in its three forms (one graph with the members one
after another, one batched graph of grouped kernels, N separate sessions), and the sub-ensembles between one member
and all of them, measured exactly like every fused point."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..base.combine import COMBINES, DEFAULT_COMBINE, combine_outputs
from ..models.data import Splits
from ..graph.onnx import onnx_nodes
from ..fuse import ensemble
from ..measure.metrics import scores
from ..measure.runners import OrtRunner, SessionsRunner, peak_memory_mb, scoring_threads
from .points import export_and_measure
from .candidate import Candidate, measure, with_agreement
from .kept import kept_outputs
from ..targets import Target

EXACT = ("ensemble", "ensemble_batched", "ensemble_sessions")
EXACT_LABELS = {"ensemble": "ensemble (members one after another, one graph)",
                "ensemble_batched": "ensemble, batched"}


def exact_label(name: str, module: nn.Module) -> str:
    """An exact ensemble's label; the batched one says its form (grouped kernels, or a member axis)."""
    form = getattr(module.heads[0], "form", None) if name == "ensemble_batched" else None
    return EXACT_LABELS[name] + (f" ({form})" if form else "")


def member_logits(files: list[str], splits: Splits, split: str, cache: Path | None = None) -> np.ndarray:
    """Every member's outputs on the `split` (members, inputs, classes), from its exported graph (kept in `cache`
    when it ran before)."""
    return np.stack([kept_outputs(cache, OrtRunner(f, scoring_threads()), splits, split)[0] for f in files])


def choose_combine(logits: np.ndarray, y: np.ndarray) -> str:
    """Mean of logits or of probabilities, whichever combines the members' (members, inputs, classes) validation
    outputs more accurately (lower NLL breaks a tie; the mean of logits on a full tie): on members trained on
    label-skewed shards the two differ by points, because a member's confident logits on classes it never saw swamp a
    mean of logits but not a mean of probabilities."""
    def merit(rule: str) -> tuple[float, float]:
        out = combine_outputs(torch.from_numpy(np.asarray(logits)), 0, rule).numpy()
        sc = scores(out, torch.as_tensor(y))
        return sc["accuracy"], -sc["nll"]
    return max(COMBINES, key=merit)


def _how(combine: str) -> str:
    return ", mean of probabilities" if combine == "probs" else ""


def exact_ensembles(members: list[nn.Module], member_files: list[str], splits: Splits, target: Target,
                    out_dir: Path, combine: str = DEFAULT_COMBINE,
                    cache: Path | None = None) -> tuple[dict[str, Candidate], dict[str, nn.Module]]:
    """The exact ensembles as candidates, and the modules of the two that are one graph, combining by `combine`.
    Each also gives every member's logits (head_logits), for the uncertainty of their disagreement. The N-sessions
    form is onnxruntime's own, so a `cuda` target measures the two one-graph forms only. `cache`: the run's cache
    folder (graphs exported before, their outputs)."""
    seq = ensemble(members, combine=combine, head_outputs=True)
    batched = seq.fastest()
    rows, modules = {}, {}
    for name, module in (("ensemble", seq), ("ensemble_batched", batched)) if batched.batched else (("ensemble", seq),):
        rows[name] = export_and_measure(module, splits, out_dir / f"{name}.onnx", target, cache=cache, key=name,
                                        label=exact_label(name, module) + _how(combine), kind="ensemble",
                                        combine=combine)
        modules[name] = module
    if target.runtime != "cuda":
        threads = target.threads
        runner = SessionsRunner(member_files, threads, combine)
        predictor = SessionsRunner(member_files, scoring_threads(), combine)
        rows["ensemble_sessions"] = measure(
            seq, splits, batch_sizes=target.batch_sizes, threads=threads, runner=runner, predictor=predictor,
            key="ensemble_sessions", label=f"ensemble, {len(members)} separate sessions{_how(combine)}", cache=cache,
            kind="ensemble", combine=combine,
            onnx_nodes=sum(onnx_nodes(f) for f in member_files),
            peak_memory_mb=peak_memory_mb(member_files, max(target.batch_sizes), threads))
    reference = rows["ensemble"].test_predictions
    return {k: with_agreement(r, reference) for k, r in rows.items()}, modules


def select_members(logits: np.ndarray, y: torch.Tensor) -> list[tuple[int, ...]]:
    """Greedy forward selection on validation (the members' `logits` there, labels `y`), as Caruana's ensemble
    selection: start from the most accurate member and add, one at a time, the member whose addition gives the most
    accurate mean of logits (lower NLL breaks ties). The nested subsets of 2 ... N-1 members, each sorted."""
    n = len(logits)

    def merit(subset: list[int]) -> tuple[float, float]:
        s = scores(logits[subset].mean(0), y)
        return s["accuracy"], -s["nll"]

    chosen = [max(range(n), key=lambda i: merit([i]))]
    out = []
    while len(chosen) < n - 1:
        chosen.append(max((j for j in range(n) if j not in chosen), key=lambda j: merit(chosen + [j])))
        out.append(tuple(sorted(chosen)))
    return out


def sub_ensembles(members: list[nn.Module], splits: Splits, target: Target, out_dir: Path,
                  reference: np.ndarray, val_logits: np.ndarray,
                  cache: Path | None = None) -> tuple[list[Candidate], dict[str, nn.Module]]:
    """Each selected subset of members as one batched graph with heads, combining as its members' validation
    outputs (`val_logits`) say: the middle ground between one member and the whole ensemble, at k/N of its MACs;
    also as INT8 when the target weighs INT8."""
    rows, modules = [], {}
    for subset in select_members(val_logits, splits.y_val):
        how = choose_combine(val_logits[list(subset)], splits.y_val.numpy())
        module = ensemble([members[i] for i in subset], combine=how, head_outputs=True).fastest()
        key = "sub-ensemble-" + "-".join(map(str, subset))
        label = f"sub-ensemble of members {', '.join(map(str, subset))} " \
                f"({'batched' if module.batched else 'one graph'}{_how(how)})"
        for precision in ("fp32", "int8") if target.int8 else ("fp32",):
            tag = "-int8" if precision == "int8" else ""
            row = export_and_measure(module, splits, out_dir / f"{key}{tag}.onnx", target, precision, cache,
                                     key=key + tag, kind="sub-ensemble", members=subset, combine=how,
                                     label=label + (", INT8" if tag else ""))
            rows.append(with_agreement(row, reference))
        modules[key] = module
    return rows, modules


def int8_ensembles(modules: dict[str, nn.Module], splits: Splits, target: Target, out_dir: Path,
                   reference: np.ndarray) -> list[Candidate]:
    """The one-graph ensembles as INT8 QDQ graphs: candidates like any other, no longer exact, so never the
    baseline latencies are compared with."""
    rows = []
    for name in (n for n in ("ensemble", "ensemble_batched") if n in modules):
        row = export_and_measure(modules[name], splits, out_dir / f"{name}-int8.onnx", target, "int8",
                                 key=f"{name}-int8", label=f"{exact_label(name, modules[name])}, INT8", kind="ensemble")
        rows.append(with_agreement(row, reference))
    return rows


def best_exact(rows: dict[str, Candidate]) -> dict[str, dict]:
    """Per batch size, the fastest exact ensemble (p50), with its expected cost per call and p99: the honest
    baseline every latency is compared with."""
    batches = rows["ensemble"].latency_by_batch
    return {b: min(({"name": name, "p50": r.p50(b), "expected": r.latency(b, "mean"), "p99": r.latency(b, "p99")}
                    for name, r in rows.items()), key=lambda e: e["p50"])
            for b in batches}


def mean_of_members(members: list[Candidate]) -> dict:
    """The report's `single` entry: scores averaged over the members (both splits), cost and latency of member 0."""
    out = members[0].to_json()
    out.pop("file", None)
    for split in ("validation", "test"):
        values = {k: [getattr(m, split)[k] for m in members] for k in members[0].test}
        out[split] = {k: float(np.mean(v)) if None not in v else None for k, v in values.items()}
    out |= out["test"] | {"key": "single", "label": "single (mean of members)",
                          "point": None, "members": [{"key": m.key, "validation": m.validation, "test": m.test}
                                                     for m in members]}
    return out
