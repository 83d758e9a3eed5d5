"""FP16 graphs for FP16 targets: weights and compute in half precision, inputs and outputs as the target says.
TensorRT 11 builds strongly typed networks, so its precision must be in the graph itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx import export_onnx
from ..base.compare import differences
from ..measure.runners import OrtRunner, predict
from ..measure.metrics import scores

# Half precision keeps ~3 decimal digits: parity against PyTorch's own FP16 run is checked at this tolerance.
FP16_ATOL = 1e-2


class Half(nn.Module):
    """The module in FP16; with `io_precision="fp32"` the casts sit inside the graph at both ends."""

    def __init__(self, module: nn.Module, io_precision: str = "fp32") -> None:
        super().__init__()
        self.module = module.half()
        self.io_half = io_precision == "fp16"

    def forward(self, x: torch.Tensor):
        out = self.module(x.half())
        if self.io_half:
            return out
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def export_fp16(module: nn.Module, example: torch.Tensor, path: str | Path, opset: int,
                io_precision: str = "fp32") -> Path:
    import copy

    half = Half(copy.deepcopy(module).eval(), io_precision).eval()
    x = example.half() if io_precision == "fp16" else example
    return export_onnx(half, x, path, opset=opset, atol=FP16_ATOL)


def precision_drop(fp32_path: str | Path, low_path: str | Path, x: torch.Tensor, y: torch.Tensor,
                   low: str = "fp16", io_precision: str = "fp32") -> dict:
    """Accuracy of the FP32 graph and of its `low`-precision form (fp16, int8) on (x, y) with onnxruntime on the
    CPU, and the largest logit difference."""
    out32 = predict(OrtRunner(fp32_path), x)
    xin = x.half() if io_precision == "fp16" else x
    out_low = predict(OrtRunner(low_path), xin).astype(np.float32)
    s32, s_low = scores(out32, y), scores(out_low, y)
    return {"fp32_accuracy": s32["accuracy"], f"{low}_accuracy": s_low["accuracy"],
            "accuracy_drop": s32["accuracy"] - s_low["accuracy"], f"{low}_nll": s_low["nll"],
            "max_abs_logit_diff": differences([out_low], [out32])[0],
            "prediction_agreement": float((out32.argmax(1) == out_low.argmax(1)).mean())}
