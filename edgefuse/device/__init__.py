"""The device stage (named apart from the build/ output folder): static TensorRT check, FP16 graph, engine builder
and the deploy bundle."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ..errors import EdgefuseError
from ..targets import Target
from .bundle import write_bundle
from .check import CheckReport, check_onnx, format_report
from .precision import export_fp16, fp16_drop


def prepare_device(target: Target, module: nn.Module, onnx_file: Path, example: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor, out_dir: Path, summary: str, console: Console) -> dict:
    """For a TensorRT target: the FP16 graph and its accuracy drop, the static check of the file the device will
    build (an error when it cannot build), and the bundle with its self-check. Returns the report's entries."""
    out: dict = {}
    device_file = onnx_file
    if target.precision == "fp16":
        fp16_file = export_fp16(module, example, out_dir / "candidates" / "model_fp16.onnx", target.opset,
                                target.io_precision)
        out["fp16"] = fp16_drop(onnx_file, fp16_file, x, y, target.io_precision)
        console.print(f"[bold]fp16[/]: accuracy {out['fp16']['fp16_accuracy']:.4f} "
                      f"(drop {out['fp16']['accuracy_drop']:+.4f} vs FP32, onnxruntime CPU)")
        if target.strongly_typed:
            device_file = fp16_file
    check = check_onnx(device_file, target)
    out["static_check"] = check.as_dict()
    console.print(format_report(check))
    if not check.ok:
        raise EdgefuseError(f"{target.name}: the model will not build: {check.errors[0]}")
    bundle_check = write_bundle(out_dir, target, Path(target.source), device_file, module, x, summary)
    out["bundle"] = {"path": "bundle/", "self_check_onnxruntime": bundle_check}
    if not bundle_check["ok"]:
        raise EdgefuseError(f"{target.name}: the bundle's self-check failed: {bundle_check['problems'][0]}")
    return out


def build_engine(onnx_file: str | Path, target: Target, engine_file: str | Path,
                 timing_cache: str | Path | None = None) -> Path:
    """Build a TensorRT engine here (needs a GPU and the TensorRT bindings: `pip install 'edgefuse[tensorrt]'`)."""
    from . import deploy
    from .bundle import target_dict

    if target.runtime != "tensorrt":
        raise EdgefuseError(f"target '{target.name}' runs on {target.runtime}, not TensorRT")
    if not torch.cuda.is_available():
        raise EdgefuseError("building a TensorRT engine needs an NVIDIA GPU and none is visible here; copy the "
                            "deploy bundle (make export TARGET=...) to the device and run deploy.py there")
    try:
        return deploy.build_engine(Path(onnx_file), target_dict(target), Path(engine_file),
                                   Path(timing_cache) if timing_cache else None)
    except deploy.DeployError as e:
        raise EdgefuseError(str(e)) from None


__all__ = ["CheckReport", "build_engine", "check_onnx", "format_report", "prepare_device", "write_bundle"]
