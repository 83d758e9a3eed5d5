"""An α model's graph form, chosen by measurement on the target's runtime. Its mixed layers run either as blocks
(the fused units from every input, each member's isolated units from the fused inputs and its own: fewest MACs, but
two or three operators joined by slices, an add and a concatenation per layer) or as single dense layers (zeros
multiplied, one kernel per layer, its BatchNorm folded). fuse/dense.py makes a layer dense by a MACs rule; which
form runs faster depends on the widths and the runtime, so where the whole model also has an all-dense form, both
are timed and the faster is kept. On the default zoo (onnxruntime CPU, 1 thread) the all-dense α 0.25 graph ran
0.85× the blocks' latency at batch 1 for 1.32× their MACs; at α 0.5 and 0.75 the blocks stayed faster."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
from torch import nn

from ..fuse.dense import densify
from ..graph.onnx import export_onnx
from ..measure.runners import OrtRunner, stream_latency
from ..models.data import Splits
from ..targets import Target

FORM_PASSES = 2  # the quick timing that picks a form; the row is timed in full afterwards, as every row


def faster_form(module: nn.Module, splits: Splits, target: Target, scratch: Path) -> tuple[nn.Module, str]:
    """`module` (an α model, dense where the MACs rule says) or its all-dense copy, whichever has the lower p50
    latency on the target's onnxruntime (geometric mean over its batch sizes), and which that was: "blocks" or
    "dense". A target timed elsewhere (TensorRT on the device, torch on a CUDA GPU) keeps `module`, as does a model
    with no further dense layer to make. `scratch`: a path prefix for the two graphs, removed afterwards."""
    if target.runtime != "onnxruntime":
        return module, "blocks"
    dense = copy.deepcopy(module)
    if not densify(dense, math.inf):
        return module, "blocks"
    x = splits.x_test.numpy()

    def cost(m: nn.Module, name: str) -> float:
        path = export_onnx(m, splits.example, scratch.with_name(f"{scratch.name}-{name}.onnx"), opset=target.opset)
        try:
            runner = OrtRunner(path, target.threads)
            p50 = [stream_latency(runner, x, b, passes=FORM_PASSES)["p50"] for b in target.batch_sizes]
        finally:
            path.unlink(missing_ok=True)
        return float(np.exp(np.mean(np.log(p50))))

    return (dense, "dense") if cost(dense, "dense") < cost(module, "blocks") else (module, "blocks")
