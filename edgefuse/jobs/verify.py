"""`ef.verify`: a fused model the user built, next to the field every export measures (each member, the exact
ensembles, sub-ensembles and cascades, by the same `measure_field`), measured alike on the target, chosen among on
validation data and reported on test data the choice never saw."""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ..run.candidate import torch_predictions, with_agreement
from ..run.points import export_and_measure
from ..run.choose import choose, target_budget
from ..run.field import FieldPlan, head, measure_field
from ..run.setup import GIVEN, Setup
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
    tgt = replace(load_target(target), precisions=())  # INT8 graphs calibrate on training images: verify has none
    budget = target_budget(tgt)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        s = Setup(list(models), type(models[0]).__name__, splits, None, {"given": list(models)}, {},
                  torch_predictions(ensemble(models), x), GIVEN, {})
        f = measure_field(s, tgt, [], budget, Console(stderr=True, quiet=True),
                          FieldPlan(root / "candidates", pick=False))
        row = export_and_measure(fused, splits, root / "candidates" / "fused.onnx", tgt, key="fused",
                                 label="fused (given)", kind="fused")
        row = with_agreement(row, s.ensemble_predictions)
        choice = choose(f.rows + [row], budget, f.exact["ensemble"])
        data = {"dataset": "given", **used, "n_validation": len(xv), "n_test": len(x)}
        top = head(tgt, s.label, len(models), data, budget) | {
            "batched_heads": None, "max_depth": None, "align_method": "given", "distillation": None}
        report = build_report(top, f.members, f.exact, f.others + [row], choice, root)
        report["given"] = report["candidates"][-1]
        if out_dir is not None:
            write_report(report, root)
    return report
