"""What one run builds and the next can reuse, under the run's cache folder: fused points (fused and repaired — an
lsq repair takes seconds to a minute a point), distilled weights, and a graph's outputs on the validation and test
data (scoring the slowest graphs takes seconds). An entry is keyed by everything its result depends on: the models'
tensors, the data it was calibrated on, trained on or run on, the point and its settings and, for a whole pickled
module, the package's code; a graph's outputs by the graph files' bytes. A cut or unreadable entry is built again,
never trusted. Latency is never kept: every run times every candidate."""
from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..base.errors import first_line, warn_once
from ..base.files import atomic_write_bytes, file_digest
from ..measure.runners import Runner, predict_with_heads
from ..models.data import Splits


def fingerprint(models: list[nn.Module], *parts: str, tensors: list[torch.Tensor] = ()) -> str:
    """Identity of a job's inputs: its models' tensors, `parts` and any other `tensors` (calibration batches)."""
    h = hashlib.sha256("\0".join(parts).encode())
    for m in models:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """The package's source: a pickled module is rebuilt by its classes' code, so any change to it is a new key."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def kept_module(path: Path | None, build: Callable[[], nn.Module], what: str) -> tuple[nn.Module, bool]:
    """The module stored at `path`, else `build()`'s, stored there; and whether it was loaded. Whole modules are
    pickled (a fused model's layout is made while it is built), so only this run's own cache folder is read."""
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                module = torch.load(f, weights_only=False)
            if isinstance(module, nn.Module):
                return module.eval(), True
            raise TypeError(f"it holds a {type(module).__name__}")
        except Exception as e:
            warn_once(f"the kept {what} {path} does not load ({first_line(e)}): built again")
    module = build()
    if path is not None:
        buf = io.BytesIO()
        try:
            torch.save(module, buf)
        except Exception as e:  # a module that does not pickle (a traced function, a lambda) is built each run
            warn_once(f"a {what} is not kept for the next run: it does not pickle ({first_line(e)})")
            return module, False
        atomic_write_bytes(path, buf.getvalue())
        # the run goes on with the module as the next run will load it, so both export the same graph (the graph
        # cache keys on the module's code and tensors, which a round trip through pickle may reorder)
        module = torch.load(io.BytesIO(buf.getvalue()), weights_only=False).eval()
    return module, False


def kept_value(path: Path | None, compute: Callable[[], object], what: str) -> tuple[object, bool]:
    """A value of tensors, numbers and strings (in lists and dicts) stored at `path`, else `compute()`'s, stored
    there; and whether it was loaded."""
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                return torch.load(f, weights_only=True), True
        except Exception as e:
            warn_once(f"the kept {what} {path} does not load ({first_line(e)}): computed again")
    value = compute()
    if path is not None:
        buf = io.BytesIO()
        torch.save(value, buf)
        atomic_write_bytes(path, buf.getvalue())
    return value, False


def kept_state(path: Path | None, module: nn.Module, train: Callable[[], None], what: str) -> bool:
    """Load `module`'s weights from `path` when stored there, else `train()` it in place and store them; whether
    they were loaded."""
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                module.load_state_dict(torch.load(f, weights_only=True))
            return True
        except Exception as e:
            warn_once(f"the kept {what} {path} do not load ({first_line(e)}): trained again")
    train()
    if path is not None:
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        atomic_write_bytes(path, buf.getvalue())
    return False


def kept_outputs(cache: Path | None, runner: Runner, splits: Splits, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`runner`'s outputs (logits, and every head's where it gives them) on the `split` ("validation" or "test"),
    read from `cache`/scores when the same graph files ran on the same data before; only a runner of graph files
    (onnxruntime) is kept."""
    x = splits.x_val if split == "validation" else splits.x_test
    graphs = getattr(runner, "graphs", None)
    if cache is None or not graphs:
        return predict_with_heads(runner, x)
    ident = [file_digest(g) for g in graphs] + [getattr(runner, "combine", ""), splits.digest, split]
    path = Path(cache) / "scores" / f"{hashlib.sha256(chr(0).join(ident).encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["logits"], f["heads"] if "heads" in f else None
        except Exception as e:
            warn_once(f"the kept outputs {path} do not load ({first_line(e)}): computed again")
    logits, heads = predict_with_heads(runner, x)
    buf = io.BytesIO()
    np.savez(buf, logits=logits, **({} if heads is None else {"heads": heads}))
    atomic_write_bytes(path, buf.getvalue())
    return logits, heads
