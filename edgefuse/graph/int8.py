"""INT8 graphs: an explicitly quantized ONNX graph (QuantizeLinear/DequantizeLinear pairs, the form TensorRT 8 and
later take, and onnxruntime's CPU provider runs), made by onnxruntime.quantization's static post-training quantizer:
QDQ format, symmetric INT8 (TensorRT's only INT8 form), per-channel weight scales for convolutions and linears,
biases left in FP32 (an INT32 DequantizeLinear, the quantizer's default, is refused by TensorRT's parser: the static
check caught it), activation ranges from min/max over calibration images of the training split — never validation
or test.
NVIDIA's own quantizer (nvidia-modelopt) is not used: its ONNX extra requires cupy-cuda12x and onnxruntime-gpu ~1.24,
which neither install nor run on a CPU machine, and would replace the onnxruntime this project measures with."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ..base.compare import differences
from ..base.errors import EdgefuseError
from ..base.files import atomic_write_bytes
from ..measure.runners import OrtRunner

CALIBRATION_IMAGES = 512  # from the training split; min/max ranges settle well before this on the zoo nets
CALIBRATION_BATCH = 64
# A TensorRT INT8 engine against onnxruntime's INT8 run of the same QDQ graph, on logits: both round to the same scales
# but differ in fusions and accumulation order (onnxruntime against onnx's reference QDQ arithmetic differed by up to
# 0.12 on the zoo's alpha graphs), so the bundle's INT8 check is loose: it catches a wrong graph, not rounding.
INT8_ATOL, INT8_RTOL = 0.5, 0.1
_WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Graph:
    """A quantized graph and what its scales came from."""
    path: Path
    calibration_images: int
    calibration_batches: int
    quantized_tensors: int
    kept_higher: tuple[str, ...]
    weight_scales: tuple[float, float]
    activation_scales: tuple[float, float]
    reduce_range: bool = False

    def summary(self) -> dict:
        return {"calibration": {"split": "train", "images": self.calibration_images,
                                "batches": self.calibration_batches, "method": "minmax, symmetric"},
                "weight_bits": 7 if self.reduce_range else 8,
                "quantized_tensors": self.quantized_tensors, "kept_higher_precision": list(self.kept_higher),
                "weight_scale_range": list(self.weight_scales),
                "activation_scale_range": list(self.activation_scales)}


def _reader(name: str, x: torch.Tensor):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: b.numpy()} for b in x.split(CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


def saturating_cpu() -> bool:
    """An x86 CPU without VNNI: onnxruntime's INT8 kernels there add pairs of 8-bit products in 16 bits, which
    saturates (on the digits test CNN: logits off by 0.28 of their largest value, 22 % of the predictions changed),
    so weights are quantized to 7 bits (the quantizer's reduce_range: 0.024 and none changed) for the INT8 accuracy
    measured here to be the graph's and not the kernel's. The summary says which (`weight_bits`)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "vnni" not in flags


@contextlib.contextmanager
def _quiet():
    """The quantizer logs advice (run its pre-processing) on the root logger at WARNING: not for our users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _ends(model: onnx.ModelProto) -> list[str]:
    """The first and the last weighted node (Conv/Gemm/MatMul) of the graph, in graph order."""
    weighted = [n.name for n in model.graph.node if n.op_type in _WEIGHTED]
    return sorted({weighted[0], weighted[-1]}) if weighted else []


def quantize_int8(fp32_path: str | Path, calibration: torch.Tensor, out_path: str | Path,
                  keep_ends: bool = False) -> Int8Graph:
    """The INT8 QDQ graph of an FP32 ONNX file. `calibration`: training-split inputs (the first
    CALIBRATION_IMAGES are used). `keep_ends`: the first and last weighted layers stay in FP32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    x = calibration[:CALIBRATION_IMAGES].float().contiguous()
    if len(x) == 0:
        raise EdgefuseError("INT8 calibration needs at least one training image")
    model = onnx.load(str(fp32_path))
    for node in model.graph.node:  # the quantizer excludes and reports nodes by name: give every node one
        node.name = node.name or f"{node.op_type}_{id(node)}"
    keep = _ends(model) if keep_ends else []
    reduce = saturating_cpu()
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        named, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(named))
        quantize_static(str(named), str(quantized), _reader(model.graph.input[0].name, x),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=keep, calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=reduce,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
                        calibration_cache_path=os.path.join(tmp, "cache"))
        out = atomic_write_bytes(Path(out_path), quantized.read_bytes())
    q = onnx.load(str(out))
    weight, act = _scales(q)
    return Int8Graph(path=Path(out), calibration_images=len(x), calibration_batches=-(-len(x) // CALIBRATION_BATCH),
                     quantized_tensors=sum(n.op_type == "QuantizeLinear" for n in q.graph.node) + len(weight),
                     kept_higher=tuple(keep), weight_scales=_span(weight), activation_scales=_span(act),
                     reduce_range=reduce)


def _scales(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The scales of every DequantizeLinear: of weights (its input is a stored tensor, one scale per output channel)
    and of activations, each by the name of the tensor it dequantizes."""
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weight, act = {}, {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[1] in init:
            (weight if n.input[0] in init else act)[n.input[0]] = np.atleast_1d(init[n.input[1]])
    return weight, act


def _span(scales: dict[str, np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([v.reshape(-1) for v in scales.values()]) if scales else np.zeros(1)
    return float(values.min()), float(values.max())


def reference_parity(int8_path: str | Path, x: np.ndarray) -> float:
    """Largest difference between onnxruntime's INT8 kernels and onnx's reference evaluator, which runs the same
    QDQ graph as float quantize-dequantize arithmetic (a simulation independent of the runtime's fusions)."""
    from onnx.reference import ReferenceEvaluator

    ours = OrtRunner(int8_path)(x)
    model = onnx.load(str(int8_path))
    for op in model.opset_import:  # the evaluator implements (De)QuantizeLinear from opset 19, whose INT8 meaning
        if op.domain in ("", "ai.onnx") and op.version < 19:  # is opset 18's (19 added float8 types)
            op.version = 19
    ref = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]
    return differences([ours], [ref])[0]
