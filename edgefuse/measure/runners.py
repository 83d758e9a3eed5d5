"""One runner interface over PyTorch and onnxruntime, and latency measured the same way for every candidate."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..base.files import native
from ..base.combine import DEFAULT_COMBINE, combine_outputs


class Runner(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def scoring_threads() -> int:
    """Threads for scoring a graph on data or checking it against PyTorch (timing uses the target's): the
    process's torch thread count, which is every core unless OMP_NUM_THREADS (or a caller) says fewer, as `make
    test` does for its two workers on 2 cores."""
    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch runs on `n` threads inside the block; the caller's count is back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchRunner:
    def __init__(self, module: nn.Module, threads: int = 1) -> None:
        self.module, self.threads, self.name = module.eval(), threads, "torch"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output: the logits, then head_logits where the module gives them. The runner's thread count
        holds for its own calls only: the process's is the caller's again afterwards (repairs and distillation
        that follow a timing would otherwise run on one thread)."""
        with torch_threads(self.threads), torch.no_grad():
            out = self.module(torch.from_numpy(x))
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]


class OrtRunner:
    """onnxruntime with a fixed thread count and no spinning: on 2 cores spinning threads double p50."""

    def __init__(self, onnx_path: str | Path, threads: int = 1,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        available = set(ort.get_available_providers())
        self.session = ort.InferenceSession(native(onnx_path), opts,
                                            providers=[p for p in providers if p in available] or
                                            ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.name = "onnxruntime:" + self.session.get_providers()[0]
        self.graphs = (Path(onnx_path),)  # what it runs: its outputs are a function of these files alone

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input: x})


class SessionsRunner:
    """The ensemble as N separate onnxruntime sessions run one after another and averaged: what a user deploys
    without edgefuse, so it is one of the exact baselines."""

    def __init__(self, onnx_paths: list[str | Path], threads: int = 1, combine: str = DEFAULT_COMBINE) -> None:
        self.sessions = [OrtRunner(p, threads) for p in onnx_paths]
        self.combine, self.name = combine, f"{self.sessions[0].name} ×{len(onnx_paths)} sessions"
        self.graphs = tuple(Path(p) for p in onnx_paths)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """The combined output and every session's, as head_logits (batch, N, classes)."""
        heads = np.stack([s(x) for s in self.sessions])
        return [combine_outputs(torch.from_numpy(heads), 0, self.combine).numpy(), heads.transpose(1, 0, 2)]


def latency(runner: Runner, x: np.ndarray, warmup: int = 10, min_runs: int = 30, budget_s: float = 1.0) -> dict:
    """Milliseconds per call: min and percentiles over at least `min_runs` calls or `budget_s` seconds. A runner
    with its own clock (CUDA events) times itself."""
    if hasattr(runner, "latency"):
        return runner.latency(x, warmup=warmup, min_runs=min_runs, budget_s=budget_s)
    for _ in range(warmup):
        runner(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 10000:
            break
    return summarize(times)


PASSES = 3  # passes over the stream at most; each call's time is its median over them
PRECISION = 0.03  # stop after 2 passes when the third could move p50 and the mean by at most this share


def settled(times: list[np.ndarray], precision: float = PRECISION) -> bool:
    """Whether one more pass can no longer matter: with two passes a, b behind it, the median of three lies between
    them call by call, so the full run's p50 and mean lie between those of the per-call minima and maxima; settled
    when both spans are within `precision` of their values."""
    low, high = np.min(times, 0), np.max(times, 0)
    return all(hi - lo <= precision * lo for lo, hi in ((np.percentile(low, 50), np.percentile(high, 50)),
                                                        (low.mean(), high.mean())))


def stream_latency(runner: Runner, x: np.ndarray, batch_size: int, min_inputs: int = 1000, passes: int = PASSES,
                   warmup: int = 10) -> dict:
    """Milliseconds per call over consecutive batches of real inputs in order (cycling when the data is shorter):
    at least `min_inputs` inputs and 30 calls, so that a model whose cost depends on its input (a cascade) meets
    the data's share of hard inputs, and every other model is timed the same way. The stream runs up to `passes`
    times and each call's time is its median over the passes, so a moment of contention on a shared machine passes
    neither for a slow input nor for a worst case; a third pass is skipped when it could move p50 and the mean by
    no more than PRECISION (`settled`; `passes` in the result says how many ran). `expected` (the mean of those
    per-call times) is the cost of a call a budget binding the mean reads; p99 the worst case. A runner with its
    own clock (CUDA events) times itself."""
    if hasattr(runner, "latency"):
        return runner.latency(latency_batch(torch.from_numpy(x), batch_size))
    n = len(x)
    calls = max(30, -(-min_inputs // batch_size))
    batches = [np.take(x, np.arange(s, s + batch_size) % n, axis=0) for s in ((k * batch_size) % n
                                                                              for k in range(calls))]
    for b in batches[:warmup]:
        runner(b)
    times: list[np.ndarray] = []
    while len(times) < passes and not (len(times) == 2 == passes - 1 and settled(times)):
        row = np.zeros(calls)
        for k, b in enumerate(batches):
            t = time.perf_counter()
            runner(b)
            row[k] = (time.perf_counter() - t) * 1e3
        times.append(row)
    return summarize(list(np.median(times, 0))) | {"runs": calls * len(times), "passes": len(times)}


def summarize(times: list[float]) -> dict:
    """Percentiles of per-call times, their mean, and `expected`, the cost of a call as a budget binding the mean
    reads it: the mean here (stream_latency's per-call medians); a runner with its own clock sets it likewise."""
    a = np.asarray(times)
    return {"min": float(a.min()), "mean": float(a.mean()), "expected": float(a.mean()),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "runs": len(times)}


def peak_memory_mb(onnx_paths: list[str | Path], batch_size: int, threads: int = 1) -> float:
    """Memory onnxruntime adds to a fresh process to load the file(s) and run one batch (weights, arena,
    activations), from the process's peak resident size."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "edgefuse.measure.memory", str(batch_size), str(threads),
                          *map(str, onnx_paths)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {res.stderr.strip().splitlines()[-1:]}")
    return float(res.stdout.strip())


def latency_batch(x: torch.Tensor, batch_size: int) -> np.ndarray:
    """An input of exactly `batch_size` rows, repeating the first sample when the data set is smaller."""
    if len(x) >= batch_size:
        return x[:batch_size].numpy()
    return np.repeat(x[:1].numpy(), batch_size, axis=0)


def predict(runner: Runner, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Outputs for a whole dataset, batch by batch."""
    return np.concatenate([runner(x[i:i + batch_size].numpy()) for i in range(0, len(x), batch_size)])


def predict_with_heads(runner: Runner, x: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
    """The logits for a whole dataset and, where the runner also gives them, every head's (batch, N, classes)."""
    if not hasattr(runner, "outputs"):
        return predict(runner, x, batch_size), None
    parts = [runner.outputs(x[i:i + batch_size].numpy()) for i in range(0, len(x), batch_size)]
    logits = np.concatenate([p[0] for p in parts])
    return logits, np.concatenate([p[1] for p in parts]) if len(parts[0]) > 1 else None
