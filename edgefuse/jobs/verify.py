"""`ef.verify`: a fused model the user built, next to each member and the exact ensembles, measured alike on the
target, chosen among on validation data and reported on test data the choice never saw."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..run.baselines import choose_combine, exact_ensembles, member_logits, sub_ensembles
from ..run.candidate import torch_predictions, with_agreement
from ..run.points import export_and_measure
from ..run.choose import choose, target_budget
from ..models.data import Splits
from ..base.errors import EdgefuseError
from ..fuse import ensemble
from ..run.report import build_report, write_report
from ..targets import load_target


def labelled(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) from a pair of tensors or from labelled batches."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    else:
        pairs = [b for b in data if isinstance(b, (tuple, list)) and len(b) == 2]
        if not pairs:
            raise EdgefuseError(f"verify needs labelled {what} data: (inputs, labels) or batches of them")
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if len(x) != len(y) or len(x) < 2:
        raise EdgefuseError(f"{what} data: {len(x)} inputs and {len(y)} labels (need as many of each, at least 2)")
    return x, y


def verify(fused: nn.Module, models: list[nn.Module], data, target: str = "cpu-ort",
           out_dir: str | Path | None = None, validation=None) -> dict:
    """Fused model vs each member vs the exact ensembles, measured alike on the target's runtime. `data` is the
    labelled test data; `validation` the labelled data the choice is made on. Without `validation`, the first half
    of `data` is used to choose and only the second half is reported as test, and the report says so. Writes
    report.json/.md/pareto.png and the candidates' ONNX files when `out_dir` is given."""
    x, y = labelled(data, "test")
    if validation is None:
        half = len(x) // 2
        xv, yv, x, y = x[:half], y[:half], x[half:], y[half:]
        used = {"validation_data": f"the first {half} samples of the given data",
                "test_data": f"the other {len(x)} samples of the given data"}
    else:
        xv, yv = labelled(validation, "validation")
        used = {"validation_data": f"the given validation data ({len(xv)} samples)",
                "test_data": f"the given test data ({len(x)} samples)"}
    splits = Splits("given", x[:0], y[:0], xv, yv, x, y)
    tgt = load_target(target)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        cand = root / "candidates"
        members = [export_and_measure(m, splits, cand / f"member{i}.onnx", tgt, key=f"member{i}",
                                      label=f"member {i}", kind="member") for i, m in enumerate(models)]
        val_logits = member_logits([m.file for m in members], splits.x_val)
        exact, _ = exact_ensembles(models, [m.file for m in members], splits, tgt, cand,
                                   choose_combine(val_logits, yv.numpy()))
        row = export_and_measure(fused, splits, cand / "fused.onnx", tgt, key="fused", label="fused (given)",
                                 kind="fused")
        reference = torch_predictions(ensemble(models), x)
        members = [with_agreement(m, reference) for m in members]
        row = with_agreement(row, reference)
        subs, _ = sub_ensembles(models, splits, tgt, cand, reference, val_logits)
        budget = target_budget(tgt)
        choice = choose(members + list(exact.values()) + subs + [row], budget, exact["ensemble"])
        head = {"target": tgt.name, "arch": type(models[0]).__name__, "n_models": len(models), "dataset": "given",
                **used, "n_validation": len(xv), "n_test": len(x), "threads": tgt.threads,
                "batch_sizes": list(tgt.batch_sizes), "batched_heads": None, "max_depth": None,
                "align_method": "given", "budget": budget.as_dict(), "distillation": None}
        report = build_report(head, members, exact, subs + [row], choice, root)
        report["given"] = report["candidates"][-1]
        if out_dir is not None:
            write_report(report, root)
    return report
