"""The deploy bundle: everything a Jetson or GPU host needs to build the engine and prove it computes what the
fused model computed here. Written to a staging folder and published in one rename."""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..base.files import publish
from ..measure.runners import OrtRunner
from ..targets import Target
from . import deploy
from ..graph.int8 import INT8_ATOL, INT8_RTOL, Int8Graph

README = """# edgefuse deploy bundle: {name}

{description}. Fused model: {summary}.

Files: `model.onnx` ({graph}), `target.json` / `{name}.toml` (the target), `golden_inputs.npy` ({batch} test
images), `reference_outputs.npz` (the fused model's outputs in FP32 PyTorch), `deploy.py` (builder and checker).

## On the device
```
scp -r bundle/ user@jetson:~/edgefuse-{name}/      # copy the folder
ssh user@jetson
cd ~/edgefuse-{name} && python3 deploy.py        # build model.engine, run the golden inputs, compare, time
```
It needs python3 with numpy, and either the TensorRT Python bindings plus torch (JetPack's python3-libnvinfer and
the NVIDIA torch wheel) or the `trtexec` tool (`python3 deploy.py --runtime trtexec`; JetPack has it in
/usr/src/tensorrt/bin). It exits 0 and prints PASS when every output is within atol {atol} + rtol {rtol}·|reference|,
prints p50/p90/p99 latency, and keeps `model.engine` and `timing.cache` for later builds. Engines are not portable
across GPUs or TensorRT versions: build on the device that runs them.

Off the device, `python3 deploy.py --runtime onnxruntime` runs the same check with onnxruntime on the CPU.

Inputs not to trust: `uncertainty.json` (written beside this file by the export) names a signal and a threshold,
both chosen on validation data. `max_softmax`: flag an input when the largest softmax probability of `logits` is
below the threshold; `mutual_information`: when the mutual information of the heads' softmax probabilities
(`head_logits`, batch × N × classes: entropy of their mean minus the mean of their entropies) is above it.
{int8}"""

INT8_README = """
## INT8
`int8/` holds the INT8 graph of the same model (explicit QuantizeLinear/DequantizeLinear pairs, calibrated on
{images} training images; `int8/calibration.json` gives the scales' ranges) with its own golden outputs (onnxruntime's
INT8 run) and tolerance (atol {atol}, rtol {rtol}): `python3 deploy.py --bundle int8` builds it with the INT8 flag
(on the DLA where the target names one) and lists the layers that fell back to higher precision.
"""


def target_dict(target: Target) -> dict:
    out = dataclasses.asdict(target)
    out["profile"] = list(target.batch_profile)
    out["batch_sizes"] = list(target.batch_sizes)
    return out


def _int8_bundle(folder: Path, target: Target, int8: Int8Graph, golden: torch.Tensor) -> None:
    """int8/: the QDQ graph, its golden outputs from onnxruntime's INT8 run, INT8 tolerances, calibration summary."""
    folder.mkdir()
    shutil.copyfile(int8.path, folder / "model.onnx")
    spec = target_dict(target) | {"graph": "int8", "io_precision": "fp32", "atol": INT8_ATOL, "rtol": INT8_RTOL}
    (folder / "target.json").write_text(json.dumps(spec, indent=2) + "\n")
    (folder / "calibration.json").write_text(json.dumps(int8.summary(), indent=2) + "\n")
    np.save(folder / "golden_inputs.npy", golden.numpy().astype(np.float32))
    runner = OrtRunner(int8.path)
    outs = runner.session.run(None, {runner.input: golden.numpy().astype(np.float32)})
    np.savez(folder / "reference_outputs.npz", **{f"out{i}": o.astype(np.float32) for i, o in enumerate(outs)})


def write_bundle(out_dir: str | Path, target: Target, target_file: Path, onnx_file: Path, module: nn.Module,
                 x: torch.Tensor, summary: str, int8: Int8Graph | None = None) -> dict[str, dict]:
    """Write out_dir/bundle/ (and bundle/int8/ for an INT8 graph) and check each here with onnxruntime in place of
    TensorRT; returns those checks by name ("model", "int8")."""
    out_dir = Path(out_dir)
    high = target.batch_profile[2]
    golden = x[torch.arange(high) % len(x)]  # the largest batch the engine takes, real images throughout
    with torch.no_grad():
        outs = module.eval()(golden)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".bundle-"))
    try:
        shutil.copyfile(onnx_file, stage / "model.onnx")
        shutil.copyfile(target_file, stage / f"{target.name}.toml")
        shutil.copyfile(deploy.__file__, stage / "deploy.py")
        (stage / "target.json").write_text(json.dumps(target_dict(target), indent=2) + "\n")
        io = np.float16 if target.io_precision == "fp16" else np.float32
        np.save(stage / "golden_inputs.npy", golden.numpy().astype(io))
        np.savez(stage / "reference_outputs.npz", **{f"out{i}": o.numpy().astype(np.float32)
                                                     for i, o in enumerate(outs)})
        graph = "FP16 graph, FP32 inputs and outputs" if target.strongly_typed else \
            "FP32 graph; FP16 chosen by the builder flag" if target.precision == "fp16" else "FP32 graph"
        extra = INT8_README.format(images=int8.calibration_images, atol=INT8_ATOL, rtol=INT8_RTOL) if int8 else ""
        (stage / "README.md").write_text(README.format(
            name=target.name, description=target.description, summary=summary, graph=graph, batch=len(golden),
            atol=target.atol, rtol=target.rtol, int8=extra))
        checks = {"model": deploy.check_bundle(stage, "onnxruntime")}
        if int8 is not None:
            _int8_bundle(stage / "int8", target, int8, golden)
            checks["int8"] = deploy.check_bundle(stage / "int8", "onnxruntime")
        publish(stage, out_dir / "bundle")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return checks
