"""Cascade candidates: the member most accurate on validation runs first, and the other members of an ensemble
that contains it (the whole ensemble, or a selected sub-ensemble) run only where its gate score is below a
threshold. The gate (a registered score of base/cascade.py), the combine rule and the thresholds are chosen on
validation; every row is then measured like any other candidate, by running its one ONNX graph
(graph/cascade.py): scores on both splits, latency per call over the test inputs in order at each batch size
(as every candidate's), peak memory, MACs as the validation mean and the worst case."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..base.cascade import GATES, CascadeRule
from ..fuse import ensemble
from ..graph.onnx import export_onnx, onnx_nodes
from ..graph.cascade import cascade_graph
from ..measure.cascade import calls_escalated
from ..measure.metrics import macs, misclassification_auroc, params, scores
from ..measure.runners import OrtRunner, peak_memory_mb, scoring_threads, stream_latency
from ..measure.uncertainty import flag_rule
from ..models.data import Splits
from ..targets import Target
from .baselines import choose_combine, member_logits
from .candidate import Candidate, with_agreement
from .kept import kept_outputs

RATES = (0.05, 0.1, 0.2, 0.35)  # shares of validation inputs escalated, one cascade row each
SHIFT = 2.0  # a test escalation rate this many times above or below validation's: the inputs have shifted


def cascade_sets(n: int, subsets: list[tuple[int, ...]], first: int) -> list[tuple[int, ...]]:
    """The ensembles a cascade from `first` escalates to: the selected sub-ensembles that contain it, and all n."""
    return [s for s in dict.fromkeys([*subsets, tuple(range(n))]) if first in s]


def choose_gate(first_logits: np.ndarray, y: np.ndarray) -> str:
    """The gate score that best tells the first stage's right answers from its wrong ones on validation (AUROC)."""
    correct = first_logits.argmax(1) == y
    return max(GATES, key=lambda g: misclassification_auroc(GATES[g](first_logits), correct) or 0.0)


def cascades(members: list[Candidate], modules: list[nn.Module], subsets: list[tuple[int, ...]], splits: Splits,
             target: Target, out_dir: Path, reference: np.ndarray,
             cache: Path | None = None) -> tuple[list[Candidate], dict[str, nn.Module]]:
    """Cascade rows from the best member on validation to each ensemble containing it, at each rate of RATES, and
    each row's reference module (the rule over the PyTorch members) by key. `cache`: the run's cache folder, where
    the members' outputs were kept when they were scored."""
    val = member_logits([m.file for m in members], splits, "validation", cache)
    first = max(range(len(members)), key=lambda i: (members[i].accuracy, -members[i].validation["nll"]))
    y_val = splits.y_val.numpy()
    first_logits = {"validation": val[first],
                    "test": kept_outputs(cache, OrtRunner(members[first].file, scoring_threads()), splits, "test")[0]}
    gate = choose_gate(val[first], y_val)
    score = GATES[gate](val[first])
    rows, refs = [], {}
    for members_set in cascade_sets(len(members), subsets, first):
        rest = tuple(i for i in members_set if i != first)
        rule_combine = choose_combine(val[list(members_set)], y_val)
        rest_file, rest_module = _rest_graph(rest, members, modules, splits, target, out_dir)
        for threshold in dict.fromkeys(float(min(1.0, np.quantile(score, r))) for r in RATES):
            rule = CascadeRule(first, rest, gate, threshold, rule_combine)
            row = _measure(rule, members, first_logits, (rest_file, rest_module), splits, target, out_dir, cache)
            rows.append(with_agreement(row, reference))
            refs[row.key] = Reference(rule, modules)
    return rows, refs


def _rest_graph(rest: tuple[int, ...], members: list[Candidate], modules: list[nn.Module], splits: Splits,
                target: Target, out_dir: Path) -> tuple[str, nn.Module]:
    """The second stage's graph: the one missing member's own file, or the missing members as one batched graph
    whose second output is each member's logits."""
    if len(rest) == 1:
        return members[rest[0]].file, modules[rest[0]]
    module = ensemble([modules[i] for i in rest], head_outputs=True).fastest()
    path = export_onnx(module, splits.example, out_dir / f"cascade-rest-{'-'.join(map(str, rest))}.onnx",
                       opset=target.opset)  # written afresh: a sweep's folder may hold another run's
    return str(path), module


class Reference(nn.Module):
    """The cascade computed by the rule of base/cascade.py over the members' PyTorch modules: what its ONNX graph is
    checked against (parity), as every shipped graph is checked against its PyTorch model."""

    def __init__(self, rule: CascadeRule, modules: list[nn.Module]) -> None:
        super().__init__()
        self.rule = rule
        self.first = modules[rule.first].eval()
        self.rest = nn.ModuleList([modules[i].eval() for i in rule.rest])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def rest(rows: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(rows)
            return torch.stack([m(t) for m in self.rest], 1).numpy()
        with torch.no_grad():
            out, _ = self.rule.run(x.numpy(), lambda a: self.first(torch.from_numpy(a)).numpy(), rest)
        return torch.from_numpy(out)


def _measure(rule: CascadeRule, members: list[Candidate], first_logits: dict[str, np.ndarray],
             second: tuple[str, nn.Module], splits: Splits, target: Target, out_dir: Path,
             cache: Path | None) -> Candidate:
    """One cascade row: its one-graph form (graph/cascade.py) scored on both splits and timed on a stream of test
    inputs, the escalation share from the rule on the first stage's logits."""
    first, (rest_file, rest_module) = members[rule.first], second
    key = f"cascade-{rule.first}-to-{'-'.join(map(str, rule.members))}-t{rule.threshold:.4f}"
    t = time.perf_counter()
    graph = str(cascade_graph(rule, first.file, rest_file, out_dir / f"{key}.onnx"))
    seconds, t = {"export": time.perf_counter() - t}, time.perf_counter()
    predictor = OrtRunner(graph, scoring_threads())
    val, test = (kept_outputs(cache, predictor, splits, split)[0] for split in ("validation", "test"))
    x_test = splits.x_test.numpy()
    timer = OrtRunner(graph, target.threads)
    lat = {str(b): stream_latency(timer, x_test, b) for b in target.batch_sizes}
    masks = {split: rule.escalate(first_logits[split]) for split in ("validation", "test")}
    rate_val, rate_test = float(masks["validation"].mean()), float(masks["test"].mean())
    first_macs, rest_macs = first.macs, macs(rest_module, splits.x_test[:1])
    y_val, y_test = splits.y_val.numpy(), splits.y_test.numpy()
    names = ", ".join(map(str, rule.rest))
    label = (f"cascade: member {rule.first}, then {'members' if len(rule.rest) > 1 else 'member'} {names} where "
             f"{rule.gate.replace('_', ' ')} < {rule.threshold:.3f} ({rate_val:.0%} of validation)")
    info = rule.to_json() | {
        "stages": [first.file, rest_file], "escalated": {"validation": rate_val, "test": rate_test},
        "calls_escalated": {str(b): calls_escalated(masks["test"], b) for b in target.batch_sizes},
        "macs_worst": first_macs + rest_macs, "macs_mean_test": round(first_macs + rate_test * rest_macs),
        "shifted": _shifted(rate_val, rate_test)}
    memory = peak_memory_mb([graph], max(target.batch_sizes), target.threads)
    seconds["measure"] = time.perf_counter() - t
    return Candidate(
        key=key, label=label, kind="cascade", validation=scores(val, splits.y_val), test=scores(test, splits.y_test),
        macs=round(first_macs + rate_val * rest_macs), params=first.params + params(rest_module),
        latency_by_batch=lat, runtime=timer.name,
        peak_memory_mb=memory, seconds={k: round(v, 2) for k, v in seconds.items()},
        onnx_nodes=onnx_nodes(graph), file=graph, members=tuple(sorted(rule.members)), cascade=info,
        combine=rule.combine,
        uncertainty=flag_rule((val, None), y_val, (test, None), y_test),
        val_correct=val.argmax(1) == y_val, test_predictions=test.argmax(1))


def _shifted(rate_val: float, rate_test: float) -> bool:
    """The test escalation rate differs from validation's by more than SHIFT×: the inputs are not what the
    threshold was chosen on."""
    lo, hi = sorted((rate_val, rate_test))
    return hi > SHIFT * lo if lo > 0 else hi > 0.01
