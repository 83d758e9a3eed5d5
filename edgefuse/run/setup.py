"""What every candidate of one run shares: the N models (the user's or the zoo's), the three data splits, the
permutation spec and the alignment, and the exact ensemble's test predictions (for agreement)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from torch import nn

from ..align import align
from .candidate import torch_predictions
from ..base.validate import check_models
from ..base.errors import warn_once
from ..models.data import Splits
from ..models.partition import parse_partition
from .config import RunConfig
from ..models.fit import check_fit
from ..models.sources import load_data
from ..fuse import ensemble
from ..spec.permspec import PermSpec, permutation_spec


@dataclass(frozen=True)
class Setup:
    models: list[nn.Module]
    label: str
    splits: Splits
    spec: PermSpec
    aligned: dict[str, list[nn.Module]]
    align_seconds: dict[str, float]
    ensemble_predictions: np.ndarray
    zoo_partition: str | None = None  # the zoo members' training data, in words; None for the user's models

    def data_lines(self) -> dict[str, str]:
        """What was used for what, in words for the report: the source as given, where each split came from,
        counts, classes and the input shape."""
        s = self.splits
        train, val, test = s.origins or ("", "", "")
        return {"dataset": s.name, "data_source": s.name, "train_data": train, "validation_data": val,
                "test_data": test, "n_validation": len(s.x_val), "n_test": len(s.x_test), "n_train": len(s.x_train),
                "classes": list(s.classes) or s.n_classes, "input_shape": list(s.input_shape),
                "calibration_images": s.n_calib, "zoo_partition": self.zoo_partition}


def prepare(run: RunConfig, console: Console) -> Setup:
    """Load or train the zoo when no models are given, check the models, read the data (a source as `load_data`
    takes it, or its splits), check that data and models fit each other, align once per method."""
    models = run.model_list
    label = run.arch if models is None else type(models[0]).__name__
    partition = parse_partition(run.partition)
    if models is None:
        from ..models.zoo import zoo_models
        console.print(f"[bold]zoo[/]: {run.n} × {run.arch} on Fashion-MNIST, {partition.describe()} (cached under "
                      f"{run.cache})")
        models, _ = zoo_models(run.arch, run.n, cache=run.cache, quiet=console.quiet, partition=partition)
    elif partition.kind != "all":
        warn_once("--partition shapes the zoo's training data; your models are used as they were trained")
    check_models(models, "export")
    splits = run.data if isinstance(run.data, Splits) else load_data(run.data, run.val_size)
    splits = splits.with_calibration(run.calibration_images)
    check_fit(models[0], splits)
    spec = permutation_spec(models[0], splits.example)
    aligned, seconds = {}, {}
    for method in run.methods:
        t0 = time.perf_counter()
        aligned[method] = align(models, spec, method=method, data=splits.calib_batches)
        seconds[method] = time.perf_counter() - t0
        console.print(f"[bold]align[/]: {method} matching of {len(models)} models, {len(spec.groups)} groups, "
                      f"{seconds[method]:.1f} s; {len(spec.cut_points)} cut points")
    reference = torch_predictions(ensemble(models), splits.x_test)
    return Setup(models, label, splits, spec, aligned, seconds, reference,
                 partition.describe() if run.models is None else None)
