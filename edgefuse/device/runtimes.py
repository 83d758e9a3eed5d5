"""The runtimes a bundle's graphs run on, behind one interface (call, latency, memory_mb): TensorRT's Python API
(engines.py), the `trtexec` tool where the bindings are missing, and onnxruntime on the CPU, which is how bundles
are tested off the device.

Copied as-is into every deploy bundle beside deploy.py: Python 3.8+ and numpy, plus the runtime's own package."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

try:  # in the package, and as a script's sibling in a bundle
    from .engines import MIN_RUNS, WARMUP_S, TrtRunner, timed, import_tensorrt, build_engine, precision_flags
    from .golden import DeployError
except ImportError:
    from engines import MIN_RUNS, WARMUP_S, TrtRunner, timed, import_tensorrt, build_engine, precision_flags
    from golden import DeployError

RUNTIMES = ("tensorrt", "trtexec", "onnxruntime")


class TrtexecRunner:
    """The `trtexec` tool (JetPack ships it in /usr/src/tensorrt/bin) where the Python bindings are missing: the
    first call builds and saves the engine, later ones load it; inputs go in as raw files, outputs and per-run times
    come back as JSON. Memory is not reported."""

    runtime = "trtexec"

    def __init__(self, onnx_path: Path, target: dict, engine_path: Path, timing_cache: Path) -> None:
        self.exe = shutil.which("trtexec") or next((p for p in ("/usr/src/tensorrt/bin/trtexec",)
                                                    if os.path.exists(p)), None)
        if self.exe is None:
            raise DeployError("trtexec not found (JetPack: /usr/src/tensorrt/bin/trtexec); install TensorRT")
        self.onnx, self.target, self.engine, self.cache = onnx_path, target, engine_path, timing_cache
        self.built = False

    def _run(self, x: np.ndarray, work: Path, extra: list[str]) -> None:
        dtype = np.float16 if self.target.get("io_precision") == "fp16" else np.float32
        x.astype(dtype).tofile(work / "input.bin")
        low, opt, high = self.target["profile"]
        rest = "x".join(str(d) for d in x.shape[1:])
        cmd = [self.exe, f"--shapes=input:{x.shape[0]}x{rest}", f"--loadInputs=input:{work / 'input.bin'}"]
        if self.built:
            cmd.append(f"--loadEngine={self.engine}")
        else:
            cmd += [f"--onnx={self.onnx}", f"--saveEngine={self.engine}", f"--minShapes=input:{low}x{rest}",
                    f"--optShapes=input:{opt}x{rest}", f"--maxShapes=input:{high}x{rest}",
                    f"--memPoolSize=workspace:{self.target['workspace_mb']}M", f"--timingCacheFile={self.cache}"]
            cmd += [f"--{flag.lower()}" for flag in precision_flags(self.target)]
            if self.target.get("strongly_typed"):
                cmd.append("--stronglyTyped")
            if self.target.get("dla_core") is not None:
                cmd.append(f"--useDLACore={self.target['dla_core']}")
                if self.target.get("gpu_fallback", True):
                    cmd.append("--allowGPUFallback")
        proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DeployError("trtexec failed: " + ((proc.stdout + proc.stderr).strip().splitlines() or ["?"])[-1])
        self.built = True

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="edgefuse-trtexec-") as tmp:
            work = Path(tmp)
            self._run(x, work, ["--iterations=1", "--duration=0", "--warmUp=0",
                                f"--exportOutput={work / 'out.json'}"])
            outs = json.loads((work / "out.json").read_text())
        return [np.asarray(o["values"], dtype=np.float32).reshape(
            o["dimensions"] if isinstance(o["dimensions"], list) else [int(d) for d in o["dimensions"].split("x")])
            for o in outs]

    def latency(self, x: np.ndarray, seconds: float = 1.0) -> list[float]:
        with tempfile.TemporaryDirectory(prefix="edgefuse-trtexec-") as tmp:
            work = Path(tmp)
            self._run(x, work, [f"--duration={seconds:g}", f"--warmUp={WARMUP_S * 1e3:g}",
                                f"--iterations={MIN_RUNS}", f"--exportTimes={work / 'times.json'}"])
            return [t["latencyMs"] for t in json.loads((work / "times.json").read_text())]

    def memory_mb(self) -> None:
        return None


class OrtRunner:
    """onnxruntime on the CPU, one thread: the same check and timing without TensorRT. Memory: the graph's
    weights (the file's size)."""

    runtime = "onnxruntime"

    def __init__(self, onnx_path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeployError("onnxruntime is not installed") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 1, 3
        self.path = Path(onnx_path)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input, self.dtype = inp.name, np.float16 if inp.type == "tensor(float16)" else np.float32

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return [o.astype(np.float32) for o in self.session.run(None, {self.input: x.astype(self.dtype)})]

    def latency(self, x: np.ndarray, seconds: float = 1.0) -> list[float]:
        feed = {self.input: x.astype(self.dtype)}

        def call() -> float:
            t = time.perf_counter()
            self.session.run(None, feed)
            return (time.perf_counter() - t) * 1e3
        return timed(call, seconds)

    def memory_mb(self) -> float:
        return self.path.stat().st_size / 2**20


def resolve(runtime: str) -> str:
    """`auto`: the TensorRT Python API where it and torch import, else the trtexec tool."""
    if runtime == "auto":
        try:
            import_tensorrt()
            import torch  # noqa: F401  (device buffers for the Python runner)
            return "tensorrt"
        except (DeployError, ImportError):
            return "trtexec"
    if runtime not in RUNTIMES:
        raise DeployError(f"unknown runtime '{runtime}' (auto, {', '.join(RUNTIMES)})")
    return runtime


def open_engine(folder: Path, target: dict, runtime: str, timing_cache: Path):
    """A runner of folder/model.onnx on `runtime` (resolved); for TensorRT the engine is built first, to
    folder/model.engine, with the shared timing cache."""
    onnx, engine = folder / "model.onnx", folder / "model.engine"
    if runtime == "tensorrt":
        t0 = time.perf_counter()
        build_engine(onnx, target, engine, timing_cache)
        print(f"built {engine} in {time.perf_counter() - t0:.1f} s")
        return TrtRunner(engine)
    if runtime == "trtexec":
        return TrtexecRunner(onnx, target, engine, timing_cache)
    return OrtRunner(onnx)
