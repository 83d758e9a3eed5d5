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

from ..files import publish
from ..targets import Target
from . import deploy

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
"""


def target_dict(target: Target) -> dict:
    out = dataclasses.asdict(target)
    out["profile"] = list(target.batch_profile)
    out["batch_sizes"] = list(target.batch_sizes)
    return out


def write_bundle(out_dir: str | Path, target: Target, target_file: Path, onnx_file: Path, module: nn.Module,
                 x: torch.Tensor, summary: str) -> dict:
    """Write out_dir/bundle/ and check it here with onnxruntime in place of TensorRT; returns that check."""
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
        (stage / "README.md").write_text(README.format(
            name=target.name, description=target.description, summary=summary, graph=graph, batch=len(golden),
            atol=target.atol, rtol=target.rtol))
        check = deploy.check_bundle(stage, "onnxruntime")
        publish(stage, out_dir / "bundle")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return check
