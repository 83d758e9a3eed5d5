"""What the benchmarks share: the torch thread count, set once and said in every result, and each finished zoo's
result kept as a JSON file with its digest, so that a stopped run resumes where it stopped and a file that was cut
short or edited is measured again rather than trusted. Benchmarks import it by name (python benchmarks/X.py)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from edgefuse.base.files import atomic_write_text


def threads(n: int) -> int:
    """Torch's thread count for this benchmark (on 2 shared cores one is often faster than two)."""
    torch.set_num_threads(n)
    return n


def _digest(result: dict) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True, allow_nan=False).encode()).hexdigest()


def resumed(path: Path, measure: Callable[[], dict]) -> dict:
    """The result stored at `path` when its digest holds; otherwise `measure()`, stored there (atomically, with its
    digest) before it is returned."""
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and stored.get("digest") == _digest(stored.get("result")):
            return stored["result"]
    except (OSError, ValueError, TypeError):
        pass
    result = measure()
    atomic_write_text(path, json.dumps({"result": result, "digest": _digest(result)}, indent=1, allow_nan=False))
    return result
