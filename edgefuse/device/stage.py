"""The host's part of the device stage: the FP16 and INT8 graphs of the shipped model, their static check, the
deploy bundle with its self-check, and a TensorRT engine built here where a GPU is."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ..base.errors import EdgefuseError
from ..models.data import Splits
from ..targets import Target
from .bundle import write_bundle
from .frontier import DeviceCandidate, host_choice
from .check import check_onnx, format_report
from ..graph.int8 import quantize_int8
from ..graph.fp16 import export_fp16, precision_drop


def prepare_device(target: Target, module: nn.Module, onnx_file: Path, splits: Splits, out_dir: Path, summary: str,
                   console: Console, candidates: tuple[DeviceCandidate, ...] = ()) -> dict:
    """For a TensorRT target: the FP16 graph and its accuracy drop on the test split, the static check of the file
    the device will build (an error when it cannot build), and the bundle with its self-check; with "int8" among the
    target's precisions, the INT8 graph too (calibrated on training images), checked and bundled in int8/.
    `onnx_file` is the shipped model's FP32 graph; `candidates` go in the bundle for the device's own choice.
    Returns the report's entries."""
    example, x, y, calibration = splits.example, splits.x_test, splits.y_test, splits.x_train
    out: dict = {}
    device_file = onnx_file
    if target.precision == "fp16":
        fp16_file = export_fp16(module, example, out_dir / "candidates" / "model_fp16.onnx", target.opset,
                                target.io_precision)
        out["fp16"] = precision_drop(onnx_file, fp16_file, x, y, "fp16", target.io_precision)
        console.print(f"[bold]fp16[/]: accuracy {out['fp16']['fp16_accuracy']:.4f} "
                      f"(drop {out['fp16']['accuracy_drop']:+.4f} vs FP32, onnxruntime CPU)")
        if target.strongly_typed:
            device_file = fp16_file
    int8 = None
    if target.int8:
        if calibration is None:
            raise EdgefuseError(f"{target.name}: INT8 needs calibration images from the training split")
        int8 = quantize_int8(onnx_file, calibration, out_dir / "candidates" / "model_int8.onnx", target.int8_keep_ends)
        out["int8"] = precision_drop(onnx_file, int8.path, x, y, "int8") | int8.summary()
        console.print(f"[bold]int8[/]: accuracy {out['int8']['int8_accuracy']:.4f} "
                      f"(drop {out['int8']['accuracy_drop']:+.4f} vs FP32, onnxruntime CPU)")
    for key, path in (("static_check", device_file), ("static_check_int8", int8.path if int8 else None)):
        if path is None:
            continue
        check = check_onnx(path, target)
        out[key] = check.as_dict()
        console.print(format_report(check))
        if not check.ok:
            raise EdgefuseError(f"{target.name}: {path.name} will not build: {check.errors[0]}")
    checks = write_bundle(out_dir, target, device_file, module, x, summary, int8, candidates)
    out["bundle"] = {"path": "bundle/", "self_check_onnxruntime": checks["model"]}
    if int8:
        out["bundle"]["self_check_int8_onnxruntime"] = checks["int8"]
    if candidates:
        out["device_choice"] = {
            "decides": "the device: python3 deploy.py --choose in the bundle times these and ships the best that fits",
            "manifest": "bundle/candidates.json", "host_choice": host_choice(candidates),
            "candidates": [{"key": c.row.key, "label": c.row.label, "graph": c.graph,
                            "validation_accuracy": c.row.accuracy, "test_accuracy": c.row.test["accuracy"],
                            "macs": c.row.macs} for c in candidates],
            "self_checks_onnxruntime_ok": all(v["ok"] for k, v in checks.items() if k.startswith("candidate "))}
    bad = next((c for c in checks.values() if not c["ok"]), None)
    if bad is not None:
        raise EdgefuseError(f"{target.name}: the bundle's self-check failed: {bad['problems'][0]}")
    return out


def build_engine(onnx_file: str | Path, target: Target, engine_file: str | Path,
                 timing_cache: str | Path | None = None) -> Path:
    """Build a TensorRT engine here (needs a GPU and the TensorRT bindings: `pip install 'edgefuse[tensorrt]'`)."""
    from .bundle import target_dict
    from .engines import build_engine as build
    from .golden import DeployError

    if target.runtime != "tensorrt":
        raise EdgefuseError(f"target '{target.name}' runs on {target.runtime}, not TensorRT")
    if not torch.cuda.is_available():
        raise EdgefuseError("building a TensorRT engine needs an NVIDIA GPU and none is visible here; copy the "
                            "deploy bundle (make export TARGET=...) to the device and run deploy.py there")
    try:
        return build(Path(onnx_file), target_dict(target), Path(engine_file),
                     Path(timing_cache) if timing_cache else None)
    except DeployError as e:
        raise EdgefuseError(str(e)) from None

