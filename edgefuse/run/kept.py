"""What one run builds and the next can reuse, under the run's cache folder: fused points (fused and repaired — an
lsq repair takes seconds to a minute a point), distilled weights, and a graph's outputs on the validation and test
data (scoring the slowest graphs takes seconds). An entry is keyed by everything its result depends on: the models'
tensors, the data it was calibrated on, trained on or run on, the point and its settings and, for a fused point
or an alignment, the package's code; a graph's outputs by the graph files' bytes. Only tensors, numbers and strings
are stored, read with weights_only=True: nothing kept runs code. A cut or unreadable entry is built again, never
trusted. Latency is never kept: every run times every candidate."""
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
    """The package's source: a kept fused point's tensors fit the layout this code makes, and an alignment is what
    this code computes, so any change to it is a new key."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def kept_module(path: Path | None, build: Callable[[], nn.Module], layout: Callable[[str | None], nn.Module],
                example: torch.Tensor) -> tuple[nn.Module, bool]:
    """The module whose tensors are stored at `path`, else `build()`'s, stored there; and whether it was loaded.
    Only tensors are stored (never pickled code): `layout(form)` makes the module as fusion lays it out before any
    repair, in its graph form (`module.form`, run/forms.py), and the tensors load into it. A module whose repair
    changed its layout beyond new biases (its layout's outputs on `example` differ) is built each run."""
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                stored = torch.load(f, weights_only=True)
            return _filled(layout(stored["form"] or None), stored["state"]), True
        except Exception as e:
            warn_once(f"the kept fused point {path} does not load ({first_line(e)}): built again")
    module = build()
    if path is None:
        return module, False
    state, form = module.state_dict(), getattr(module, "form", None)
    try:  # the run goes on with the module as the next run loads it, so both export the same graph
        again = _filled(layout(form), state)
        same = _same(module, again, example)
    except Exception:
        same = False
    if not same:
        warn_once("a fused point of these models is not kept for the next run: its repair changes its layout")
        return module, False
    _write(path, {"state": state, "form": form or ""})
    return again, False


def _filled(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`module` with `state` loaded, strictly: a layer that a repair gave a bias gets one first."""
    own = module.state_dict()
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        if key not in own and name == "bias" and getattr(module.get_submodule(owner), "bias", 0) is None:
            module.get_submodule(owner).bias = nn.Parameter(torch.empty_like(value))
    module.load_state_dict(state, strict=True)
    return module.eval()


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    """Whether two modules give the same outputs (every output, bit for bit) on `x`."""
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
    pairs = zip(out_a, out_b) if isinstance(out_a, (tuple, list)) else [(out_a, out_b)]
    return all(torch.equal(p, q) for p, q in pairs)


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
        _write(path, value)
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
        _write(path, module.state_dict())
    return False


def _write(path: Path, value: object) -> None:
    """`value` saved by torch (tensors, numbers, strings), replacing `path` at once: a killed run leaves no cut file."""
    buf = io.BytesIO()
    torch.save(value, buf)
    atomic_write_bytes(path, buf.getvalue())


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
