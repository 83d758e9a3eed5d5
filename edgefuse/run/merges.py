"""Merge candidates, for members fine-tuned from one pretrained network: the greedy soup and every registered merge
(fuse/merges.py) with its parameters chosen on validation, each BatchNorm-reset on calibration images, then
exported and measured like every other row. A merge costs one member: when it keeps the ensemble's accuracy, it is
the cheapest answer there is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fuse.merges import MERGES, merged_model
from ..models.batchnorm import reset_bn
from ..measure.metrics import scores
from ..measure.runners import TorchRunner, predict
from ..models.data import Splits
from ..targets import Target
from .candidate import Candidate, with_agreement
from .points import export_and_measure


def _merit(module: nn.Module, splits: Splits) -> tuple[float, float]:
    """Validation accuracy, then lower NLL: what every setting and every soup ingredient is chosen on."""
    s = scores(predict(TorchRunner(module.eval(), torch.get_num_threads()), splits.x_val), splits.y_val)
    return s["accuracy"], -s["nll"]


def _repaired(models: list[nn.Module], base: dict | None, merge: str, params: dict, splits: Splits) -> nn.Module:
    return reset_bn(merged_model(models, base, merge, params), splits.calib_batches)


def greedy_soup(models: list[nn.Module], splits: Splits) -> tuple[int, ...]:
    """Wortsman et al.'s greedy soup: members in order of validation accuracy, each added to the uniform soup only
    where validation accuracy (then NLL) improves. The members kept, by index."""
    order = sorted(range(len(models)), key=lambda i: _merit(models[i], splits), reverse=True)
    kept = [order[0]]
    best = _merit(models[order[0]], splits)
    for i in order[1:]:
        trial = _merit(_repaired([models[j] for j in kept + [i]], None, "soup", {}, splits), splits)
        if trial > best:
            kept, best = kept + [i], trial
    return tuple(sorted(kept))


def best_setting(models: list[nn.Module], base: dict | None, merge: str, splits: Splits) -> dict[str, float]:
    """The merge's parameters most accurate on validation (the default first, so it wins ties)."""
    return max(MERGES[merge].settings(), key=lambda p: _merit(_repaired(models, base, merge, p, splits), splits))


def merge_rows(models: list[nn.Module], base: dict | None, splits: Splits, target: Target, out_dir: Path,
               reference: np.ndarray) -> tuple[list[Candidate], dict[str, nn.Module]]:
    """The greedy soup (when it keeps more than one member) and each merge the run can make (those against a base
    only with one), measured; and their modules by key."""
    rows, modules = [], {}
    soup = greedy_soup(models, splits)
    plans = [("greedy-soup", soup, "soup", {})] if 1 < len(soup) < len(models) else []
    plans += [(name, tuple(range(len(models))), name, best_setting(models, base, name, splits))
              for name, m in MERGES.items() if base is not None or not m.needs_base]
    for key, kept, merge, params in plans:
        module = _repaired([models[i] for i in kept], base, merge, params, splits)
        label = _label(key, kept, params, len(models))
        row = export_and_measure(module, splits, out_dir / f"merge-{key}.onnx", target, key=f"merge-{key}",
                                 label=label, kind="merge",
                                 merge={"method": merge, "params": params, "members": list(kept)})
        rows.append(with_agreement(row, reference))
        modules[row.key] = module
    return rows, modules


def _label(key: str, kept: tuple[int, ...], params: dict, n: int) -> str:
    if key == "greedy-soup":
        return f"greedy soup of members {', '.join(map(str, kept))}"
    setting = ", ".join(f"{k} {v:g}" for k, v in params.items())
    return f"{key.replace('-', ' ')} of {n} members" + (f" ({setting})" if setting else "")
