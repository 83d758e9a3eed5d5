"""A bundle folder's files — target, golden inputs, reference outputs — read and checked; outputs are compared
with the references by the package's one comparator (base/compare.py, which travels as compare.py).

Copied as-is into every deploy bundle beside deploy.py: Python 3.8+ and numpy only."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

try:  # in the package, and as a script's sibling in a bundle
    from ..base.compare import mismatches
except ImportError:
    from compare import mismatches

FILES = ("model.onnx", "target.json", "golden_inputs.npy", "reference_outputs.npz")


class DeployError(Exception):
    """A problem the user can fix (missing tool, file or device); printed as one line."""


def atomic_write(path: Path, data: bytes) -> None:
    """Written beside `path` and renamed over it, with the modes a plain write would give (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # Python 3.8+


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON may hold here")


def read_json(path: Path, what: str) -> dict:
    try:
        out = json.loads(path.read_text(), parse_constant=_no_constant)
    except (ValueError, OSError) as e:
        raise DeployError(f"{path} is not a valid {what}: {e}") from None
    if not isinstance(out, dict):
        raise DeployError(f"{path} is not a valid {what}: not a JSON object")
    return out


def read_bundle(bundle: Path) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """The target, golden inputs and references, each checked: a broken bundle is "could not check", never PASS."""
    for name in FILES:
        if not (bundle / name).is_file():
            raise DeployError(f"{bundle / name} is missing: is this an edgefuse bundle?")
    target = read_json(bundle / "target.json", "target file")
    tol = [target.get(k) for k in ("atol", "rtol")]
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


def percentiles(times: list[float], input_dependent: bool = False) -> dict:
    """Milliseconds per call as trtexec reports them: min, mean, median and the 90th/99th percentiles, and
    `expected`, the cost of a call as the host's chooser reads it: the median for a graph whose every call does the
    same work, the mean for one whose cost depends on its input (a cascade over a stream of inputs)."""
    a = np.asarray(times, dtype=np.float64)
    return {"min": float(a.min()), "mean": float(a.mean()),
            "expected": float(a.mean() if input_dependent else np.percentile(a, 50)),
            **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}, "runs": int(a.size)}


def compare(outputs: list[np.ndarray], references: list[np.ndarray], target: dict) -> list[str]:
    """What differs beyond the target's atol + rtol·|reference|; an empty list means a match."""
    return mismatches(outputs, references, target["atol"], target["rtol"])
