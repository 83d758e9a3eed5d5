"""A cascade on the device: one engine per stage (the folder's model.onnx is the first stage, stage2/model.onnx the
second) and the host loop of the rule edgefuse chose it with (cascade.py, the package's base/cascade.py copied into
the bundle), so the device runs exactly what was measured on the host. A folder without cascade.json is one graph.

Copied as-is into every deploy bundle beside deploy.py: Python 3.8+ and numpy only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

try:  # in the package, and as a script's sibling in a bundle
    from ..base.cascade import DESCRIPTION, CascadeError, CascadeRule, read_cascade
    from .golden import DeployError
    from .engines import timed
    from .runtimes import open_engine
except ImportError:
    from cascade import DESCRIPTION, CascadeError, CascadeRule, read_cascade
    from engines import timed
    from golden import DeployError
    from runtimes import open_engine

ENGINES = ("model.onnx", "stage2/model.onnx")  # the stage graphs of a cascade folder, each built into an engine
STREAM = "stream_inputs.npy"  # test inputs in order: a cascade's cost depends on which inputs it meets


def read_rule(folder: Path) -> CascadeRule:
    """The folder's cascade rule, its two stage graphs (model.onnx and stage2/model.onnx, whose engines run) checked
    against their digests: a missing, swapped or edited graph, or a rule that cannot run, is one DeployError."""
    try:
        rule, paths = read_cascade(folder)
    except CascadeError as e:
        raise DeployError(str(e)) from None
    if [p.resolve() for p in paths] != [(folder / f).resolve() for f in ENGINES]:
        raise DeployError(f"{folder / DESCRIPTION}: its stage graphs must be {' and '.join(ENGINES)}")
    return rule


class CascadeRunner:
    """Both stages' engines and the rule: called on a batch, it runs the second engine on the escalated rows only.
    Timed over the folder's stream of test inputs in order, so that its latency counts the calls that escalate."""

    def __init__(self, folder: Path, target: dict, runtime: str, timing_cache: Path) -> None:
        if runtime == "trtexec":
            raise DeployError("a cascade runs its two engines from Python between calls: it needs the TensorRT "
                              "Python bindings (trtexec runs one graph per process)")
        self.rule = read_rule(folder)
        self.first = open_engine(folder, target, runtime, timing_cache)
        self.rest = open_engine(folder / "stage2", target, runtime, timing_cache)
        self.runtime = getattr(self.first, "runtime", runtime)
        try:
            self.stream = np.load(folder / STREAM, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DeployError(f"cannot read the cascade's stream inputs {folder / STREAM}: {e}") from None

    def _rest(self, x: np.ndarray) -> np.ndarray:
        out = self.rest(x)
        return out[1] if len(out) > 1 else out[0][:, None]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        out, _ = self.rule.run(x, lambda a: self.first(a)[0], self._rest)
        return [out]

    def latency(self, x: np.ndarray, seconds: float = 1.0) -> list[float]:
        """Per call at the batch size of `x`, over consecutive batches of the stream inputs (cycling)."""
        import time

        b, n, k = len(x), len(self.stream), [0]

        def call() -> float:
            rows = self.stream[np.arange(k[0], k[0] + b) % n].astype(x.dtype)
            k[0] = (k[0] + b) % n
            t = time.perf_counter()
            self(rows)
            return (time.perf_counter() - t) * 1e3
        return timed(call, seconds)

    def memory_mb(self) -> float | None:
        parts = [self.first.memory_mb(), self.rest.memory_mb()]
        return None if None in parts else float(sum(parts))


def open_runner(folder: Path, target: dict, runtime: str, timing_cache: Path):
    """A folder's runner: a cascade's two engines and rule where it holds cascade.json, else its one graph's."""
    if (folder / DESCRIPTION).is_file():
        return CascadeRunner(folder, target, runtime, timing_cache)
    return open_engine(folder, target, runtime, timing_cache)
