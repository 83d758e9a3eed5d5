"""TensorRT through its Python API: engines built with the target's precision, profile, DLA and workspace
settings and a shared timing cache, run with torch CUDA buffers and timed with CUDA events as trtexec times them
(warm-up, then enough runs).

Copied as-is into every deploy bundle beside deploy.py: Python 3.8+, numpy, the TensorRT bindings and torch."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

try:  # in the package, and as a script's sibling in a bundle
    from .golden import DeployError, atomic_write
except ImportError:
    from golden import DeployError, atomic_write

WARMUP_S = 0.2  # trtexec's default warm-up
MIN_RUNS = 100


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise DeployError("the TensorRT Python bindings are not installed (pip install 'edgefuse[tensorrt]', or "
                          "JetPack's python3-libnvinfer); use --runtime trtexec") from None
    return trt


def precision_flags(target: dict) -> list[str]:
    """Builder flags of a weakly typed network: FP16 for an FP16 target, INT8 for a QDQ graph (`graph` = int8)."""
    if target.get("strongly_typed"):
        return []
    return [f for f, on in (("FP16", target["precision"] == "fp16"), ("INT8", target.get("graph") == "int8")) if on]


def build_engine(onnx_path: Path, target: dict, engine_path: Path, timing_cache: Path | None = None) -> Path:
    """Parse, set precision / DLA / workspace / batch profile, build and serialize, with a persistent timing cache."""
    trt = import_tensorrt()
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
    for flag in precision_flags(target):
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
    atomic_write(engine_path, bytes(serialized))
    if timing_cache:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return engine_path


def timed(call, seconds: float) -> list[float]:
    """Milliseconds of each `call()` (which returns its own time) after a warm-up: at least MIN_RUNS calls and
    `seconds` in all, at most 10,000."""
    start = time.perf_counter()
    while time.perf_counter() - start < WARMUP_S:
        call()
    times: list[float] = []
    start = time.perf_counter()
    while (len(times) < MIN_RUNS or time.perf_counter() - start < seconds) and len(times) < 10000:
        times.append(call())
    return times


class TrtRunner:
    """Runs a serialized engine with torch CUDA tensors as device buffers; times with CUDA events."""

    runtime = "tensorrt"

    def __init__(self, engine_path: Path) -> None:
        trt = import_tensorrt()
        try:
            import torch
        except ImportError:
            raise DeployError("running an engine from Python needs torch for device buffers; use --runtime "
                              "trtexec") from None
        self.torch, self.trt, self.path = torch, trt, Path(engine_path)
        self.runtime_ = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime_.deserialize_cuda_engine(self.path.read_bytes())
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

    def memory_mb(self) -> float:
        """The serialized engine (weights and kernels) plus the device memory an execution context takes."""
        scratch = getattr(self.engine, "device_memory_size_v2", None)
        scratch = self.engine.device_memory_size if scratch is None else scratch
        return (self.path.stat().st_size + int(scratch)) / 2**20

    def _dtype(self, name: str):
        return {self.trt.float32: self.torch.float32, self.trt.float16: self.torch.float16,
                self.trt.int32: self.torch.int32}[self.engine.get_tensor_dtype(name)]

    def _prepare(self, x: np.ndarray) -> list:
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

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        buffers = self._prepare(x)
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return [b.float().cpu().numpy() for b in buffers[1:]]

    def latency(self, x: np.ndarray, seconds: float = 1.0) -> list[float]:
        buffers = self._prepare(x)  # noqa: F841  (kept alive while the engine reads and writes them)
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)

        def call() -> float:
            start.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_time(end)
        return timed(call, seconds)
