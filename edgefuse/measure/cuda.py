"""The `cuda` runtime: torch on a CUDA device, eager or CUDA-graph replay, fp32 or fp16, timed with CUDA events.

Imported only where a GPU is wanted; every torch.cuda call sits behind `require_cuda`, so CPU machines get a
one-line reason instead of a traceback."""
from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..base.errors import EdgefuseError
from .runners import summarize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def require_cuda() -> str:
    """The GPU's name, or a one-line error saying why there is none."""
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch for CUDA {torch.version.cuda}"
        raise EdgefuseError(f"no CUDA GPU here ({build}, torch.cuda.is_available() is False)")
    return torch.cuda.get_device_name(0)


@contextlib.contextmanager
def _strict_fp32(strict: bool) -> Iterator[None]:
    """TF32 off while kernels are chosen and run: torch allows it for convolutions by default, which would make
    "fp32" a 10-bit-mantissa run (2.5e-4 relative off the CPU on the H200)."""
    if not strict:
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in module.modules())


class CudaRunner:
    """A module on the GPU. `graphs=True` captures one CUDA graph per input shape and replays it: at batch 1 a
    small net is launch-bound, and replay shows what a fused-kernel runtime would see. fp16 converts the weights
    and uses channels_last for convolutions (the tensor-core layout)."""

    def __init__(self, module: nn.Module, precision: str = "fp32", graphs: bool = True) -> None:
        if precision not in DTYPES:
            raise EdgefuseError(f"unknown precision '{precision}' (choose from {', '.join(DTYPES)})")
        self.device_name = require_cuda()
        self.dtype, self.graphs = DTYPES[precision], graphs
        self.strict = precision == "fp32"
        self.module = copy.deepcopy(module).eval().to("cuda", self.dtype)
        self.channels_last = _has_conv(self.module)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.captured: dict[tuple, tuple] = {}
        self.name = f"cuda:{self.device_name}:{precision}:{'graph' if graphs else 'eager'}"

    def _input(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).to("cuda", self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.ndim == 4 else t

    def _capture(self, t: torch.Tensor) -> tuple:
        static_in = t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode(), _strict_fp32(self.strict):
            for _ in range(3):
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode(), _strict_fp32(self.strict):
            static_out = self.module(static_in)
        return graph, static_in, static_out

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if not self.graphs:
            with torch.inference_mode(), _strict_fp32(self.strict):
                return self.module(t)
        key = (tuple(t.shape), t.stride())
        if key not in self.captured:
            self.captured[key] = self._capture(t)
        graph, static_in, static_out = self.captured[key]
        static_in.copy_(t)
        graph.replay()
        return static_out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output as float32 on the host: the logits, then head_logits where the module gives them."""
        out = self.forward(self._input(x))
        return [o.float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

    def latency(self, x: np.ndarray, warmup: int = 10, min_runs: int = 30, budget_s: float = 1.0) -> dict:
        """Milliseconds per call from CUDA events around each call, the input already on the device."""
        t = self._input(x)
        for _ in range(warmup):
            self.forward(t)
        torch.cuda.synchronize()
        times: list[float] = []
        start_wall = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        while (len(times) < min_runs or time.perf_counter() - start_wall < budget_s) and len(times) < 10000:
            start.record()
            self.forward(t)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return summarize(times)

    def peak_memory_mb(self, x: np.ndarray) -> float:
        """Peak GPU memory of one eager call at this batch size: weights, input and whatever the call allocates.
        Taken as a difference from what is already allocated, so other runners' leftovers (graph pools the caching
        allocator still holds) do not count, and eager because a replayed graph allocates nothing new."""
        t = self._input(x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode(), _strict_fp32(self.strict):
            self.module(t)
        torch.cuda.synchronize()
        tensors = itertools.chain(self.module.parameters(), self.module.buffers(), (t,))
        held = sum(v.numel() * v.element_size() for v in tensors)
        return (torch.cuda.max_memory_allocated() - before + held) / 2**20
