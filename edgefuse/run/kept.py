"""What one run builds and the next can reuse, under the run's cache folder: fused points (fused and repaired — an
lsq repair takes seconds to a minute a point) and distilled weights. An entry is keyed by everything its result
depends on: the models' tensors, the data it was calibrated or trained on, the point and its settings and, for a
whole pickled module, the package's code. A cut or unreadable entry is built again, never trusted."""
from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..base.errors import first_line, warn_once
from ..base.files import atomic_write_bytes


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
        torch.save(module, buf)
        atomic_write_bytes(path, buf.getvalue())
    return module, False


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
