"""Build a TensorRT engine from an edgefuse bundle on the device, run it on the golden inputs, compare with the
reference outputs at the target's tolerance, and print latency.

This file is edgefuse's TensorRT builder and runner, and it is copied as-is into every deploy bundle: it needs only
Python 3.8+, numpy and either the TensorRT Python bindings (with torch for device buffers) or the `trtexec` tool.
`--runtime onnxruntime` runs the same check with onnxruntime, which is how the bundle is tested off the device.

    python3 deploy.py [--runtime trtexec]   # in the bundle: build, check, time; exit 0 PASS, 1 FAIL, 2 could not check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class DeployError(Exception):
    """A problem the user can fix (missing tool, file or device); printed as one line."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise DeployError("the TensorRT Python bindings are not installed (pip install 'edgefuse[tensorrt]', or "
                          "JetPack's python3-libnvinfer); use --runtime trtexec") from None
    return trt


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # Python 3.8+


def _precision_flags(target: dict) -> list[str]:
    """Builder flags of a weakly typed network: FP16 for an FP16 target, INT8 for a QDQ graph (`graph` = int8)."""
    if target.get("strongly_typed"):
        return []
    return [f for f, on in (("FP16", target["precision"] == "fp16"), ("INT8", target.get("graph") == "int8")) if on]


def build_engine(onnx_path: Path, target: dict, engine_path: Path, timing_cache: Path | None = None) -> Path:
    """Parse, set precision / DLA / workspace / batch profile, build and serialize, with a persistent timing cache."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    flag_names = trt.NetworkDefinitionCreationFlag.__members__
    if int(trt.__version__.split(".")[0]) < 10 and "EXPLICIT_BATCH" in flag_names:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if target.get("strongly_typed") and "STRONGLY_TYPED" in flag_names:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise DeployError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target["workspace_mb"]) << 20)
    for flag in _precision_flags(target):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer types, for layer_types()
    if target.get("dla_core") is not None:
        if builder.num_DLA_cores == 0:
            raise DeployError("the target names a DLA core but this device has none")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(target["dla_core"])
        if target.get("gpu_fallback", True):
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    low, opt, high = target["profile"]
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        rest = tuple(inp.shape)[1:]
        profile.set_shape(inp.name, (low, *rest), (opt, *rest), (high, *rest))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError("TensorRT failed to build the engine (see the builder log above)")
    _atomic_write(engine_path, bytes(serialized))
    if timing_cache:
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return engine_path


class TrtRunner:
    """Runs a serialized engine with torch CUDA tensors as device buffers; times with CUDA events."""

    def __init__(self, engine_path: Path) -> None:
        trt = _trt()
        try:
            import torch
        except ImportError:
            raise DeployError("running an engine from Python needs torch for device buffers; use --runtime "
                              "trtexec") from None
        self.torch, self.trt = torch, trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise DeployError(f"cannot load {engine_path}: built for another GPU or TensorRT version? Rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def layer_types(self) -> dict[str, list[str]]:
        """Per output type (Int8, Half, Float, …) the engine's layers, from its detailed layer information: an INT8
        graph's layers outside "Int8" fell back to higher precision."""
        info = json.loads(self.engine.create_engine_inspector().get_engine_information(
            self.trt.LayerInformationFormat.JSON))
        out: dict[str, list[str]] = {}
        for layer in info.get("Layers", []):
            if isinstance(layer, dict) and layer.get("LayerType") != "Reformat":
                kinds = {str(o.get("Format/Datatype", "?")).split()[0] for o in layer.get("Outputs", [])}
                out.setdefault("/".join(sorted(kinds)) or "?", []).append(str(layer.get("Name", "?")))
        return out

    def _dtype(self, name: str):
        return {self.trt.float32: self.torch.float32, self.trt.float16: self.torch.float16,
                self.trt.int32: self.torch.int32}[self.engine.get_tensor_dtype(name)]

    def prepare(self, x: np.ndarray) -> list:
        torch = self.torch
        src = torch.from_numpy(x).cuda().to(self._dtype(self.inputs[0]))
        self.context.set_input_shape(self.inputs[0], tuple(src.shape))
        self.context.set_tensor_address(self.inputs[0], src.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        return [src, *outs]

    def run(self) -> None:
        self.context.execute_async_v3(self.stream.cuda_stream)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        buffers = self.prepare(x)
        self.run()
        self.stream.synchronize()
        return [b.float().cpu().numpy() for b in buffers[1:]]

    def latency(self, x: np.ndarray, runs: int = 200) -> list[float]:
        torch = self.torch
        self.prepare(x)
        for _ in range(20):
            self.run()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(runs):
            start.record(self.stream)
            self.run()
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times


def run_trtexec(bundle: Path, target: dict, x: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """Build and run with the trtexec tool (JetPack ships it in /usr/src/tensorrt/bin) when Python bindings are
    missing: the golden input is loaded from a raw file, outputs and per-run times come back as JSON."""
    exe = shutil.which("trtexec") or next((p for p in ("/usr/src/tensorrt/bin/trtexec",) if os.path.exists(p)), None)
    if exe is None:
        raise DeployError("trtexec not found (JetPack: /usr/src/tensorrt/bin/trtexec); install TensorRT")
    work = Path(tempfile.mkdtemp(prefix="edgefuse-trtexec-"))
    dtype = np.float16 if target.get("io_precision") == "fp16" else np.float32
    x.astype(dtype).tofile(work / "input.bin")
    low, opt, high = target["profile"]
    rest = "x".join(str(d) for d in x.shape[1:])
    cmd = [exe, f"--onnx={bundle / 'model.onnx'}", f"--saveEngine={bundle / 'model.engine'}",
           f"--minShapes=input:{low}x{rest}", f"--optShapes=input:{opt}x{rest}", f"--maxShapes=input:{high}x{rest}",
           f"--shapes=input:{x.shape[0]}x{rest}", f"--loadInputs=input:{work / 'input.bin'}",
           f"--exportOutput={work / 'out.json'}", f"--exportTimes={work / 'times.json'}",
           f"--memPoolSize=workspace:{target['workspace_mb']}M", f"--timingCacheFile={bundle / 'timing.cache'}"]
    cmd += [f"--{flag.lower()}" for flag in _precision_flags(target)]
    if target.get("strongly_typed"):
        cmd.append("--stronglyTyped")
    if target.get("dla_core") is not None:
        cmd.append(f"--useDLACore={target['dla_core']}")
        if target.get("gpu_fallback", True):
            cmd.append("--allowGPUFallback")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeployError("trtexec failed: " + (proc.stdout + proc.stderr).strip().splitlines()[-1])
    outs = json.loads((work / "out.json").read_text())
    results = [np.asarray(o["values"], dtype=np.float32).reshape(o["dimensions"] if isinstance(o["dimensions"], list)
                                                                   else [int(d) for d in o["dimensions"].split("x")])
               for o in outs]
    times = [t["latencyMs"] for t in json.loads((work / "times.json").read_text())]
    shutil.rmtree(work, ignore_errors=True)
    return results, times


def run_onnxruntime(bundle: Path, x: np.ndarray, runs: int = 200) -> tuple[list[np.ndarray], list[float]]:
    """The same check without TensorRT: how the bundle is tested where there is no device."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeployError("onnxruntime is not installed") from None
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = {inp.name: x.astype(np.float16 if inp.type == "tensor(float16)" else np.float32)}
    outs = [o.astype(np.float32) for o in sess.run(None, feed)]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return outs, times


def compare(outputs: list[np.ndarray], references: list[np.ndarray], atol: float, rtol: float) -> list[str]:
    """One line per output that differs beyond atol + rtol·|reference|; an empty list means a match."""
    problems = []
    if len(outputs) != len(references):
        return [f"{len(outputs)} outputs, {len(references)} references"]
    for i, (got, ref) in enumerate(zip(outputs, references)):
        if got.shape != ref.shape:
            problems.append(f"output {i}: shape {got.shape}, reference {ref.shape}")
            continue
        excess = np.abs(got - ref) - (atol + rtol * np.abs(ref))
        if (excess > 0).any() or not np.isfinite(got).all():
            problems.append(f"output {i}: max |diff| {np.abs(got - ref).max():.3g} exceeds atol {atol} + "
                            f"rtol {rtol}·|ref| at {int((excess > 0).sum())} values")
    return problems


def _read_bundle(bundle: Path) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """The target, golden inputs and references, each checked: a broken bundle is "could not check", never PASS."""
    try:
        target = json.loads((bundle / "target.json").read_text())
        tol = [target.get(k) for k in ("atol", "rtol")]
    except (ValueError, OSError, AttributeError) as e:
        raise DeployError(f"{bundle / 'target.json'} is not a valid target file: {e}") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in tol):
        raise DeployError(f"{bundle / 'target.json'}: atol and rtol must be non-negative numbers, got {tol}")
    try:  # allow_pickle=False: a bundle's arrays never run code
        x = np.load(bundle / "golden_inputs.npy", allow_pickle=False)
        with np.load(bundle / "reference_outputs.npz", allow_pickle=False) as refs:
            references = [refs[k] for k in sorted(refs.files)]
    except (ValueError, OSError, EOFError) as e:
        raise DeployError(f"cannot read the bundle's golden inputs or reference outputs: {e}") from None
    for name, arrays in (("golden inputs", [x]), ("reference outputs", references)):
        if not arrays or any(a.size == 0 or a.dtype.kind not in "fiu" or not np.isfinite(a).all() for a in arrays):
            raise DeployError(f"the bundle's {name} are empty, not numeric, or hold NaN or Inf values")
    return target, x, references


def check_bundle(bundle: Path, runtime: str = "auto") -> dict:
    """Build (TensorRT), run the golden inputs, compare, time; DeployError when the bundle cannot be checked."""
    bundle = Path(bundle)
    for name in ("model.onnx", "target.json", "golden_inputs.npy", "reference_outputs.npz"):
        if not (bundle / name).is_file():
            raise DeployError(f"{bundle / name} is missing: is this an edgefuse bundle?")
    target, x, references = _read_bundle(bundle)
    if runtime == "auto":
        try:
            _trt()
            import torch  # noqa: F401  (device buffers for the Python runner)
            runtime = "tensorrt"
        except (DeployError, ImportError):
            runtime = "trtexec"
    if runtime == "tensorrt":
        t0 = time.perf_counter()
        engine = build_engine(bundle / "model.onnx", target, bundle / "model.engine", bundle / "timing.cache")
        print(f"built {engine} in {time.perf_counter() - t0:.1f} s")
        runner = TrtRunner(engine)
        outputs, times = runner(x), runner.latency(x)
        if target.get("graph") == "int8":
            for kind, names in runner.layer_types().items():
                print(f"layers with {kind} outputs: {len(names)}" + ("" if "Int8" in kind else
                                                                    f" (higher precision: {', '.join(names[:8])})"))
    elif runtime == "trtexec":
        outputs, times = run_trtexec(bundle, target, x)
    elif runtime == "onnxruntime":
        outputs, times = run_onnxruntime(bundle, x)
    else:
        raise DeployError(f"unknown runtime '{runtime}' (auto, tensorrt, trtexec, onnxruntime)")
    problems = compare(outputs, references, target["atol"], target["rtol"])
    a = np.asarray(times)
    return {"runtime": runtime, "batch": int(x.shape[0]), "ok": not problems, "problems": problems,
            "latency_ms": {"min": float(a.min()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="bundle folder (default: here)")
    ap.add_argument("--runtime", default="auto", choices=["auto", "tensorrt", "trtexec", "onnxruntime"])
    args = ap.parse_args(argv)
    try:
        result = check_bundle(Path(args.bundle), args.runtime)
    except Exception as e:  # ours, or a runtime's own (a truncated model.onnx, a failed build): one line either way
        why = e if isinstance(e, DeployError) else f"could not check the bundle: {type(e).__name__}: " + \
            (str(e).strip().splitlines() or [""])[0]
        print(f"deploy: error: {why}", file=sys.stderr)
        return 2
    lat = result["latency_ms"]
    print(f"{result['runtime']}, batch {result['batch']}: p50 {lat['p50']:.3f} ms (min {lat['min']:.3f}, "
          f"p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f})")
    for p in result["problems"]:
        print(f"MISMATCH {p}")
    print("PASS: outputs match the references" if result["ok"] else "FAIL: outputs differ from the references")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
