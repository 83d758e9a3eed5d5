"""How N outputs become one: the mean of logits, or the log of the mean probability. Shared by the fused model, its
batched form and the N-sessions runner, so all three combine exactly alike."""
from __future__ import annotations

import math

import torch

from .errors import EdgefuseError

COMBINES = ("mean", "probs")
DEFAULT_COMBINE = "mean"  # where nothing chose the rule on validation


def check_combine(combine: str) -> None:
    if combine not in COMBINES:
        raise EdgefuseError(f"unknown combine '{combine}' (choose from {', '.join(COMBINES)})")


def combine_outputs(outs: torch.Tensor, dim: int, combine: str) -> torch.Tensor:
    """Mean over the members along `dim`; for "probs" the log of the mean probability, computed as a logsumexp
    of log-softmaxes so that confident members never produce log(0)."""
    if combine == "probs":
        return torch.logsumexp(torch.log_softmax(outs, dim=-1), dim) - math.log(outs.shape[dim])
    return outs.mean(dim)
