"""Deployment targets: one TOML file each in targets/, parsed into a frozen dataclass; unknown keys are errors."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import EdgefuseError

RUNTIMES = ("onnxruntime", "tensorrt", "cuda")
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str
    device: str
    precision: str = "fp32"
    opset: int = 18
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1,)
    max_macs_ratio: float = 0.5
    latency_budget_ms: float | None = None
    memory_budget_mb: float | None = None
    batch_heads: bool = True
    description: str = ""


def targets_dirs() -> list[Path]:
    dirs = [Path(os.environ["EDGEFUSE_TARGETS"])] if os.environ.get("EDGEFUSE_TARGETS") else []
    return dirs + [Path.cwd() / "targets", Path(__file__).resolve().parents[1] / "targets"]


def available_targets() -> list[str]:
    return sorted({p.stem for d in targets_dirs() if d.is_dir() for p in d.glob("*.toml")})


def parse_target(name: str, text: str, source: str = "<string>") -> Target:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgefuseError(f"malformed target file {source}: {e}") from None
    known = {f.name for f in fields(Target)} - {"name"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EdgefuseError(f"target file {source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    for key in ("runtime", "device"):
        if key not in raw:
            raise EdgefuseError(f"target file {source}: missing key '{key}'")
    if raw["runtime"] not in RUNTIMES:
        raise EdgefuseError(f"target file {source}: runtime must be one of {', '.join(RUNTIMES)}")
    if raw.get("precision", "fp32") not in PRECISIONS:
        raise EdgefuseError(f"target file {source}: precision must be one of {', '.join(PRECISIONS)}")
    batches = raw.get("batch_sizes", [1])
    if not batches or not all(isinstance(b, int) and b >= 1 for b in batches):
        raise EdgefuseError(f"target file {source}: batch_sizes must be a list of positive integers")
    if not 0 < float(raw.get("max_macs_ratio", 0.5)) <= 1:
        raise EdgefuseError(f"target file {source}: max_macs_ratio must be in (0, 1]")
    raw["batch_sizes"] = tuple(batches)
    return Target(name=name, **raw)


def load_target(name: str) -> Target:
    """A target by name (a file in targets/) or by path to a .toml file."""
    path = Path(name)
    if path.suffix != ".toml":
        path = next((d / f"{name}.toml" for d in targets_dirs() if (d / f"{name}.toml").is_file()), path)
    if not path.is_file():
        raise EdgefuseError(f"unknown target '{name}' (available: {', '.join(available_targets()) or 'none'})")
    return parse_target(path.stem, path.read_text(), str(path))
