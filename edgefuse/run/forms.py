"""An α model's graph form, chosen by measurement on the target's runtime. Its mixed layers run as blocks (the
fused units from every input, each member's isolated units from the fused inputs and its own: fewest MACs, but two
or three operators joined by slices, an add and a concatenation per layer), as single dense layers (zeros
multiplied, one kernel per layer, its BatchNorm folded; fuse/dense.py) or with one convolution per member for its
isolated units (the blocks' MACs, a gather instead of slices and an add; fuse/branches.py). Which runs faster
depends on the widths and the runtime, so every form that changes the model is timed and the fastest kept. In one
`make export` (onnxruntime CPU, 1 thread) α 0.25 and 0.5 ran fastest all dense and α 0.75 as branches."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..base.tie_rule import geometric_mean
from ..fuse.branches import branch
from ..fuse.dense import densify
from ..fuse.neuron import MixedLayer
from ..graph.onnx import export_onnx
from ..measure.metrics import macs
from ..measure.runners import OrtRunner, stream_latency
from ..models.data import Splits
from ..targets import Target

FORM_PASSES = 2  # the quick timing that picks a form; the row is timed in full afterwards, as every row
# Each form other than the blocks fusion builds: what makes it, in place, returning how many layers changed.
FORMS: dict[str, Callable[[nn.Module], int]] = {"dense": lambda m: densify(m, math.inf), "branches": branch}


def in_form(module: nn.Module, form: str | None) -> nn.Module:
    """`module` (as fusion builds it) made `form`, in place; "blocks" and None leave it as it is."""
    if form in FORMS:
        FORMS[form](module)
    return module


def built_form(module: nn.Module) -> str:
    """The form fusion built: "dense" where its MACs rule already made every mixed layer one dense layer (small
    isolated shares: fuse/dense.py), else "blocks"."""
    split = any(isinstance(m, MixedLayer) and (m.from_fused is not None or m.from_isolated is not None)
                for m in module.modules())
    return "blocks" if split else "dense"


def faster_form(module: nn.Module, splits: Splits, target: Target, scratch: Path,
                macs_cap: float | None = None) -> tuple[nn.Module, str]:
    """`module` (an α model, dense where the MACs rule says) or a copy in another form, whichever has the lowest
    p50 latency on the target's onnxruntime (geometric mean over its batch sizes), and which form that was:
    "blocks", "dense" or "branches". A target timed elsewhere (TensorRT on the device, torch on a CUDA GPU) keeps
    `module`, as does a model that no other form changes (named by `built_form`). `macs_cap`: the target's MACs
    budget; where some form fits it, only those that fit are timed (a dense form multiplies zeros, and a faster
    model outside the budget is one the chooser cannot ship). `scratch`: a path prefix for the graphs, removed
    afterwards."""
    if target.runtime != "onnxruntime":
        return module, built_form(module)
    candidates = {built_form(module): module}
    for form, make in FORMS.items():
        copied = copy.deepcopy(module)
        if make(copied):
            candidates[form] = copied
    if macs_cap is not None:
        candidates = {f: m for f, m in candidates.items() if macs(m, splits.example[:1]) <= macs_cap} or candidates
    if len(candidates) == 1:
        (form, only), = candidates.items()
        return only, form
    x = splits.x_test.numpy()

    def cost(m: nn.Module, name: str) -> float:
        path = export_onnx(m, splits.example, scratch.with_name(f"{scratch.name}-{name}.onnx"), opset=target.opset)
        try:
            runner = OrtRunner(path, target.threads)
            return geometric_mean(stream_latency(runner, x, b, passes=FORM_PASSES)["p50"] for b in target.batch_sizes)
        finally:
            path.unlink(missing_ok=True)

    costs = {form: cost(m, form) for form, m in candidates.items()}
    form = min(costs, key=costs.get)
    return candidates[form], form


def budget_macs(target: Target, members: list[nn.Module], example) -> float:
    """The target's MACs budget for one sample: its share of the exact ensemble's MACs (its members' sum), as the
    chooser reads it."""
    return target.max_macs_ratio * sum(macs(m, example[:1]) for m in members)
