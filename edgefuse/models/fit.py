"""Where data meets a model, checked once: the input shape runs, the output width equals the classes, and every
label is one of the model's outputs; each failure blames the side that is wrong."""
from __future__ import annotations

import torch
from torch import nn

from ..base.errors import EdgefuseError
from .data import Splits, trial_run


def output_width(model: nn.Module, x: torch.Tensor, source: str) -> int:
    """The model's number of outputs on one batch of `x`, or one line saying the input does not fit it."""
    out = trial_run(model, x, f"the model does not take the inputs of {source} (shape {tuple(x.shape[1:])})")
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise EdgefuseError(f"the model's output on {source} has shape "
                            f"{tuple(getattr(out, 'shape', ()))}: expected (batch, classes)")
    return int(out.shape[1])


def check_fit(model: nn.Module, splits: Splits) -> None:
    try:
        width = output_width(model, splits.example, splits.name)
    except EdgefuseError as e:  # an image folder made colour by one file says which
        why = getattr(splits.x_train, "why_channels", lambda: "")()
        raise EdgefuseError(f"{e}{why}") from None
    check_outputs(width, splits)


def check_outputs(width: int, splits: Splits, what: str = "the model") -> None:
    """The output width equals the classes and every label is one of the outputs: for a module and for a graph
    (`edgefuse verify`) alike."""
    if splits.classes and len(splits.classes) != width:
        raise EdgefuseError(f"{splits.name} has {len(splits.classes)} classes but {what} has {width} outputs")
    for split, y in (("train", splits.y_train), ("validation", splits.y_val), ("test", splits.y_test)):
        if y is not None and len(y) and int(y.max()) >= width:
            raise EdgefuseError(f"{splits.name}: {split} label {int(y.max())} is outside {what}'s {width} outputs "
                                f"(labels must be 0..{width - 1})")
