"""The deploy bundle: everything a Jetson or GPU host needs to build the engine and prove it computes what the
fused model computed here. Written to a staging folder and published in one rename."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..base import cascade as cascade_rule
from ..base import compare, files, tie_rule
from ..base.cascade import CascadeRule, write_description
from ..base.files import file_digest, staged
from ..measure.runners import OrtRunner
from ..targets import Target
from . import deploy
from . import stages as stages_mod
from .device_choice import MANIFEST
from .frontier import DeviceCandidate, manifest
from ..graph.int8 import INT8_ATOL, INT8_RTOL, Int8Graph

README = """# edgefuse deploy bundle: {name}

{description}. Shipped model: {summary}.

Files: `model.onnx` ({graph}), `target.json` / `{name}.toml` (the target), `golden_inputs.npy` ({batch} test
images), `reference_outputs.npz` (the model's outputs in FP32 PyTorch), `deploy.py` (builder, checker and
chooser, with its siblings golden.py, engines.py, runtimes.py, device_choice.py, stages.py, cascade.py,
compare.py, files.py and tie_rule.py, the host chooser's own rule).

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
{extra}"""

CHOOSE_README = """
## Let the device choose
The host chose `model.onnx` with the MACs share standing in for this device's latency. `candidates/` holds the
{n} candidates no other beats on validation accuracy at no higher MACs (`candidates.json`: their validation and test
accuracy, MACs, parameters and golden outputs). `python3 deploy.py --choose` builds each with this target's
settings (one shared timing cache), checks it against its golden outputs, times p50 and p99 at every batch size,
and ships the most accurate on validation within the latency and memory budgets (`--latency-ms MS` for one p50
budget at every batch size): `choice.json` says what each measured and why the winner won, `model.engine` is the
winner's engine. None fits: one line naming the fastest, exit 2, nothing written.
""" 

INT8_README = """
## INT8
`int8/` holds the INT8 graph of the same model (explicit QuantizeLinear/DequantizeLinear pairs, calibrated on
{images} training images; `int8/calibration.json` gives the scales' ranges) with its own golden outputs (onnxruntime's
INT8 run) and tolerance (atol {atol}, rtol {rtol}): `python3 deploy.py --bundle int8` builds it with the INT8 flag
(on the DLA where the target names one) and lists the layers that fell back to higher precision.
"""

SELF_CHECK_SECONDS = 0.1  # onnxruntime here: a check, not a benchmark


def target_dict(target: Target) -> dict:
    out = dataclasses.asdict(target)
    out["profile"] = list(target.batch_profile)
    out["batch_sizes"] = list(target.batch_sizes)
    return out


def _graph_folder(folder: Path, spec: dict, graph: Path, golden: torch.Tensor, module: nn.Module | None) -> None:
    """A folder deploy.py can check: the graph, its target settings, the golden inputs and the reference outputs
    (the module's FP32 outputs, or onnxruntime's run of the graph itself when there is no module: an INT8 graph)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(graph, folder / "model.onnx")
    (folder / "target.json").write_text(json.dumps(spec, indent=2) + "\n")
    io = np.float16 if spec["io_precision"] == "fp16" else np.float32
    np.save(folder / "golden_inputs.npy", golden.numpy().astype(io))
    if module is None:
        runner = OrtRunner(graph)
        outs = runner.session.run(None, {runner.input: golden.numpy().astype(np.float32)})
    else:
        with torch.no_grad():
            got = module.eval()(golden)
        outs = [o.numpy() for o in (got if isinstance(got, tuple) else [got])]
    np.savez(folder / "reference_outputs.npz", **{f"out{i}": o.astype(np.float32) for i, o in enumerate(outs)})


def _int8_spec(target: Target) -> dict:
    return target_dict(target) | {"graph": "int8", "io_precision": "fp32", "atol": INT8_ATOL, "rtol": INT8_RTOL}


STREAM_INPUTS = 512  # test inputs in order a cascade is timed on: the share that escalates is the data's


def _cascade_folder(folder: Path, row, stream: torch.Tensor) -> None:
    """What makes a candidate folder a cascade: the second stage's graph in stage2/, the rule and both stages'
    digests in cascade.json, the stream of test inputs it is timed on. model.onnx is its first stage and its
    reference outputs are the whole cascade's."""
    (folder / "stage2").mkdir()
    shutil.copyfile(row.cascade["stages"][1], folder / stages_mod.ENGINES[1])
    write_description(folder, CascadeRule.from_json(row.cascade), stages_mod.ENGINES)
    np.save(folder / stages_mod.STREAM, stream.numpy().astype(np.float32))


def _candidates(stage: Path, target: Target, golden: torch.Tensor, stream: torch.Tensor,
                candidates: list[DeviceCandidate]) -> dict[str, dict]:
    """candidates/<key>/ for each device candidate and the manifest; each folder self-checked here."""
    checks = {}
    for dc in candidates:
        folder = stage / "candidates" / dc.row.key
        _graph_folder(folder, _int8_spec(target) if dc.graph == "int8" else target_dict(target), dc.file, golden,
                      dc.module)
        if dc.graph == "cascade":
            _cascade_folder(folder, dc.row, stream)
        checks[f"candidate {dc.row.key}"] = deploy.check_bundle(folder, "onnxruntime", SELF_CHECK_SECONDS)
    written = manifest(candidates, target)
    for row in written["candidates"]:  # what the device checks before it times anything
        folder = stage / row["folder"]
        row["sha256"] = {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*"))
                         if p.is_file() and p.suffix != ".engine" and p.name != "timing.cache"}
    (stage / MANIFEST).write_text(json.dumps(written, indent=2, allow_nan=False) + "\n")
    return checks


def write_bundle(out_dir: str | Path, target: Target, onnx_file: Path, module: nn.Module, x: torch.Tensor,
                 summary: str, int8: Int8Graph | None = None, candidates: tuple[DeviceCandidate, ...] = (),
                 ) -> dict[str, dict]:
    """Write out_dir/bundle/ (bundle/int8/ for an INT8 graph, bundle/candidates/ and candidates.json for the
    device's own choice) and check each graph here with onnxruntime in place of TensorRT; returns those checks by
    name ("model", "int8", "candidate KEY")."""
    out_dir = Path(out_dir)
    high = target.batch_profile[2]
    golden = x[torch.arange(high) % len(x)]  # the largest batch the engine takes, real images throughout
    with staged(out_dir / "bundle", root=out_dir, prefix=".bundle-") as stage:
        _graph_folder(stage, target_dict(target), onnx_file, golden, module)
        shutil.copyfile(target.source, stage / f"{target.name}.toml")
        for script in deploy.SCRIPTS:
            shutil.copyfile(Path(deploy.__file__).with_name(script), stage / script)
        shutil.copyfile(compare.__file__, stage / "compare.py")
        shutil.copyfile(cascade_rule.__file__, stage / "cascade.py")
        shutil.copyfile(files.__file__, stage / "files.py")
        shutil.copyfile(tie_rule.__file__, stage / "tie_rule.py")
        graph = "FP16 graph, FP32 inputs and outputs" if target.strongly_typed else \
            "FP32 graph; FP16 chosen by the builder flag" if target.precision == "fp16" else "FP32 graph"
        extra = INT8_README.format(images=int8.calibration_images, atol=INT8_ATOL, rtol=INT8_RTOL) if int8 else ""
        extra += CHOOSE_README.format(n=len(candidates)) if candidates else ""
        (stage / "README.md").write_text(README.format(
            name=target.name, description=target.description, summary=summary, graph=graph, batch=len(golden),
            atol=target.atol, rtol=target.rtol, extra=extra))
        checks = {"model": deploy.check_bundle(stage, "onnxruntime", SELF_CHECK_SECONDS)}
        if int8 is not None:
            _graph_folder(stage / "int8", _int8_spec(target), int8.path, golden, None)
            (stage / "int8" / "calibration.json").write_text(json.dumps(int8.summary(), indent=2) + "\n")
            checks["int8"] = deploy.check_bundle(stage / "int8", "onnxruntime", SELF_CHECK_SECONDS)
        if candidates:
            checks |= _candidates(stage, target, golden, x[:STREAM_INPUTS], list(candidates))
    return checks
