"""What every candidate of one run shares: the N models (the user's or the zoo's), the three data splits, the
permutation spec and the alignment, and the exact ensemble's test predictions (for agreement)."""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from torch import nn

from ..align import align_perms
from .candidate import torch_predictions
from ..base.validate import check_models
from ..base.errors import warn_once
from ..models.data import Splits
from ..models.partition import parse_partition
from .config import RunConfig
from .kept import code_digest, fingerprint, kept_value
from ..models.fit import check_fit
from ..models.sources import load_data
from ..fuse import ensemble
from ..fuse.batched import batch_refusals
from ..spec.permspec import PermSpec, permutation_spec, permute

SHARED_BASIN = 0.9  # alignment leaving this share of units in place: the members share a basin (fine-tunes)


@dataclass(frozen=True)
class Regime:
    """How the members relate: "fine-tunes" of one pretrained network (given with --base, or recognised by
    alignment leaving their units in place) or "from scratch"; `why` says how it was found."""
    name: str
    why: str
    identity_share: float | None = None  # the share of units alignment left where they were

    def as_dict(self) -> dict:
        return {"name": self.name, "why": self.why, "identity_share": self.identity_share}


GIVEN = Regime("given", "the models and the fused model are measured as given (ef.verify): nothing is aligned")


@dataclass(frozen=True)
class Setup:
    models: list[nn.Module]
    label: str
    splits: Splits
    spec: PermSpec | None  # None where nothing is fused here (ef.verify)
    aligned: dict[str, list[nn.Module]]
    align_seconds: dict[str, float]
    ensemble_predictions: np.ndarray
    regime: Regime
    seconds: dict[str, float]  # wall-clock seconds of each phase so far: models, data, align
    base: dict | None = None  # the pretrained weights the members were fine-tuned from, where known
    zoo_partition: str | None = None  # the zoo members' training data, in words; None for the user's models
    batch_refusal: str | None = None  # why the members have no batched form at all, None where they have one
    alpha_refusal: str | None = None  # why they have no grouped-kernel form, which alpha fusion builds on (attention)

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
    """Load or train the zoo when no models are given, check the models (and the base), read the data (a source as
    `load_data` takes it, or its splits), check that data and models fit each other, align once per method — unless
    the members are fine-tunes of a given base, where alignment could only return the identity — and say which
    regime the members are in."""
    t0 = time.perf_counter()
    models, base = run.model_list, run.base
    label = run.arch if models is None else type(models[0]).__name__
    partition = parse_partition(run.partition)
    if models is None and run.zoo == "finetune":
        from ..models.finetune import finetune_zoo
        console.print(f"[bold]zoo[/]: one {run.arch} pretrained on half of Fashion-MNIST's training images, then "
                      f"fine-tuned {run.n} times on the other half ({partition.describe()}; cached under {run.cache})")
        models, base, _ = finetune_zoo(run.arch, run.n, cache=run.cache, quiet=console.quiet, partition=partition)
    elif models is None:
        from ..models.zoo import zoo_models
        console.print(f"[bold]zoo[/]: {run.n} × {run.arch} on Fashion-MNIST, {partition.describe()} (cached under "
                      f"{run.cache})")
        models, _ = zoo_models(run.arch, run.n, cache=run.cache, quiet=console.quiet, partition=partition)
    elif partition.kind != "all":
        warn_once("--partition shapes the zoo's training data; your models are used as they were trained")
    check_models(models, "export")
    if isinstance(base, nn.Module):
        base = base.state_dict()
    t1 = time.perf_counter()
    splits = run.data if isinstance(run.data, Splits) else load_data(run.data, run.val_size)
    splits = splits.with_calibration(run.calibration_images)
    check_fit(models[0], splits)
    spec = permutation_spec(models[0], splits.example)
    t2 = time.perf_counter()
    aligned, seconds, shares = {}, {}, {}
    for method in run.methods:
        if base is not None:
            aligned[method], seconds[method] = list(models), 0.0
            continue
        (perms, seconds[method]), loaded = kept_value(_perms_path(run, models, method, splits),
                                                       lambda: _aligned(models, spec, method, splits), "alignment")
        aligned[method] = [permute(m, spec, p) for m, p in zip(models, perms)]
        shares[method] = identity_share(perms)
        console.print(f"[bold]align[/]: {method} matching of {len(models)} models, {len(spec.groups)} groups, "
                      f"{seconds[method]:.1f} s{' (kept from an earlier run)' if loaded else ''}; "
                      f"{len(spec.cut_points)} cut points; {shares[method]:.0%} of units left in place")
    regime = regime_of(base, shares)
    console.print(f"[bold]regime[/]: {regime.name} — {regime.why}")
    reference = torch_predictions(ensemble(models), splits.x_test)
    phases = {"models": t1 - t0, "data": t2 - t1, "align": time.perf_counter() - t2}
    return Setup(models, label, splits, spec, aligned, seconds, reference, regime, phases, base,
                 partition.describe() if run.models is None else None, *batch_refusals(models))


def _aligned(models: list[nn.Module], spec, method: str, splits: Splits) -> tuple[list[dict], float]:
    """The permutations and the seconds they took."""
    start = time.perf_counter()
    perms = align_perms(models, spec, method=method, data=splits.calib_batches)
    return perms, time.perf_counter() - start


def _perms_path(run: RunConfig, models: list[nn.Module], method: str, splits: Splits) -> Path | None:
    """Where an alignment is kept: keyed by the models, the method, the calibration images and the code."""
    if not run.cache:
        return None
    key = fingerprint(models, method, str(tuple(splits.example.shape)), code_digest(), tensors=splits.calib_batches)
    return Path(run.cache) / "aligned" / f"{key}.pt"


def identity_share(perms: list[dict]) -> float:
    """The share of the members' hidden units (all but the first member's, which is the reference) that
    alignment left where they were: about 1/width for members trained from scratch, near 1 for fine-tunes of one
    network."""
    moved = [(p == torch.arange(len(p))).float() for perm in perms[1:] for p in perm.values()]
    return float(torch.cat(moved).mean()) if moved else 1.0


def regime_of(base: dict | None, shares: dict[str, float]) -> Regime:
    if base is not None:
        return Regime("fine-tunes", "the members were fine-tuned from a known base (--base, or the fine-tune zoo's): "
                      "alignment skipped, as it could only return the identity")
    share = min(shares.values())
    if share >= SHARED_BASIN:
        return Regime("fine-tunes", f"alignment left {share:.0%} of the units in place (at least "
                      f"{SHARED_BASIN:.0%}): the members share a basin, as fine-tunes of one network do", share)
    return Regime("from scratch", f"alignment moved {1 - share:.0%} of the units: the members were trained "
                  "apart", share)
