"""Deployment targets: one TOML file each in targets/, parsed into a frozen dataclass; unknown keys are errors."""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ..base.errors import EdgefuseError

RUNTIMES = ("onnxruntime", "tensorrt", "cuda")
PRECISIONS = ("fp32", "fp16")
EXTRA_PRECISIONS = ("int8",)  # weighed as candidates next to `precision`: an INT8 QDQ graph of each
BINDS = ("mean", "p99")  # what a latency budget binds: the expected cost per call, or its p99
DEFAULT_BINDS = "mean"

# The distillation budget, the one default for every target and for `DistillConfig`: each distilled candidate (the
# member most accurate on validation, and the best depth and alpha within the budget) trains this many steps of this
# many unlabeled training images towards the ensemble, 12–29 s each for the zoo CNN on 2 cores (66–76 s of a fresh
# `make export`'s 3m51s–4m18s). Member 0 of the zoo CNN gained
# 0.0004 / 0.0014 / 0.0008 validation accuracy at 400 / 800 / 1,600 steps, so little is lost by stopping early, and
# 500 keeps `make export` near its time. A target raises it where time allows, or sets 0 for no distillation.
DISTILL_STEPS = 500
DISTILL_BATCH_SIZE = 128


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str
    device: str
    precision: str = "fp32"
    precisions: tuple[str, ...] = ()
    int8_keep_ends: bool = False
    opset: int = 18
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1,)
    max_macs_ratio: float = 0.5
    latency_budget_ms: float | tuple[float, ...] | None = None
    memory_budget_mb: float | None = None
    min_auroc: float | None = None
    latency_binds: str = DEFAULT_BINDS  # what latency and MACs budgets bind: "mean" per call, or "p99" (worst case)
    batch_heads: bool = True
    distill_steps: int = DISTILL_STEPS
    distill_batch_size: int = DISTILL_BATCH_SIZE
    distill_augment: bool = True
    distill_per_head: bool = False
    description: str = ""
    tensorrt: str | None = None
    workspace_mb: int = 1024
    profile: tuple[int, int, int] | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    strongly_typed: bool = False
    io_precision: str = "fp32"
    atol: float = 1e-3
    rtol: float = 1e-3
    source: str = ""

    @property
    def int8(self) -> bool:
        """Whether every candidate is also weighed as an INT8 graph (`precisions` names "int8")."""
        return "int8" in self.precisions

    @property
    def batch_profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the engine's optimization profile; by default it spans the batch sizes."""
        return self.profile or (min(self.batch_sizes), self.batch_sizes[0], max(self.batch_sizes))

    @property
    def trt_version(self) -> tuple[int, int] | None:
        if self.tensorrt is None:
            return None
        major, minor = self.tensorrt.split(".")[:2]
        return int(major), int(minor)


def opset_range(trt: tuple[int, int]) -> tuple[int, int]:
    """Opsets the TensorRT ONNX parser takes: 8.x up to 17, 10.x 9 to 20 (shared/tensorrt/README.md); 11.x is
    not in the table and is assumed to take what 10.x takes."""
    return (7, 17) if trt[0] < 10 else (9, 20)


def _validate(raw: dict, source: str) -> None:
    """Impossible combinations, each as one line naming the file."""
    def fail(msg: str) -> None:
        raise EdgefuseError(f"target file {source}: {msg}")

    trt = raw.get("tensorrt")
    if raw["runtime"] == "tensorrt":
        if not isinstance(trt, str) or not all(p.isdigit() for p in trt.split(".")[:2]) or "." not in trt:
            fail("a tensorrt target needs tensorrt = \"MAJOR.MINOR\" (e.g. \"10.3\")")
        version = tuple(int(p) for p in trt.split(".")[:2])
        low, high = opset_range(version)
        if not low <= raw.get("opset", 18) <= high:
            fail(f"TensorRT {trt} parses ONNX opsets {low} to {high}, not {raw.get('opset', 18)}")
        if version[0] >= 11 and not raw.get("strongly_typed", False):
            fail("TensorRT 11 builds strongly typed networks only: set strongly_typed = true")
    elif trt is not None or raw.get("dla_core") is not None:
        fail(f"tensorrt and dla_core apply to runtime = \"tensorrt\" only, not {raw['runtime']}")
    if raw.get("io_precision", "fp32") not in PRECISIONS:
        fail(f"io_precision must be one of {', '.join(PRECISIONS)}")
    precisions = raw.get("precisions", [])
    if not isinstance(precisions, list) or not all(p in PRECISIONS + EXTRA_PRECISIONS for p in precisions):
        fail(f"precisions must be a list of {', '.join(PRECISIONS + EXTRA_PRECISIONS)}")
    if precisions and raw.get("precision", "fp32") not in precisions:
        fail(f"precisions {precisions} must include the target's precision {raw.get('precision', 'fp32')!r}")
    if "int8" in precisions and raw["runtime"] == "cuda":
        fail("INT8 candidates are QDQ ONNX graphs: for runtime = \"onnxruntime\" or \"tensorrt\"")
    profile = raw.get("profile")
    if profile is not None:
        if len(profile) != 3 or not all(_is_int(b) and 1 <= b <= MAX_BATCH for b in profile) or \
                not profile[0] <= profile[1] <= profile[2]:
            fail(f"profile must be [min, opt, max] batch sizes with 1 <= min <= opt <= max <= {MAX_BATCH}")
        if not all(profile[0] <= b <= profile[2] for b in raw.get("batch_sizes", [1])):
            fail(f"batch_sizes {raw.get('batch_sizes')} fall outside the profile {profile}")
    if raw.get("dla_core") is not None:
        version = tuple(int(p) for p in trt.split(".")[:2])
        if raw.get("precision", "fp32") == "fp32":
            fail("DLA runs FP16 or INT8 only: set precision = \"fp16\"")
        batches = raw.get("batch_sizes", [1])
        lo_hi = (profile[0], profile[2]) if profile else (min(batches), max(batches))
        if lo_hi[0] != lo_hi[1]:
            fail(f"DLA needs a static batch (profile min = max), this target spans batch {lo_hi[0]} to {lo_hi[1]}")
        if (11, 0) <= version < (11, 4):
            fail(f"TensorRT {trt} has no DLA (11.0 to 11.3 dropped it)")
        if version >= (11, 4) and not raw.get("strongly_typed", False):
            fail("DLA on TensorRT 11.4+ needs a strongly typed network: set strongly_typed = true")


# Each key's type and range: ints are never booleans, numbers are finite; (low, high) bounds are inclusive except
# max_macs_ratio's lower one. Opsets: what edgefuse's two exporters write (TorchScript 9 to 20, dynamo 18 to 23).
INTS = {"opset": (9, 23), "threads": (1, 256), "workspace_mb": (1, 1 << 20), "distill_steps": (0, 10_000_000),
        "distill_batch_size": (1, 65536)}
NUMBERS = {"max_macs_ratio": (0.0, 1.0), "memory_budget_mb": (1e-9, 1e9), "atol": (0.0, 1e9), "rtol": (0.0, 1e9),
           "min_auroc": (0.0, 1.0)}
BOOLS = ("batch_heads", "gpu_fallback", "strongly_typed", "distill_augment", "int8_keep_ends", "distill_per_head")
STRINGS = ("runtime", "device", "precision", "description", "tensorrt", "io_precision", "latency_binds")
MAX_BATCH = 65536


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_values(raw: dict, source: str) -> None:
    """Types and ranges of every key, each failure one line naming the key and what it must be."""
    def fail(key: str, what: str) -> None:
        raise EdgefuseError(f"target file {source}: {key} must be {what}, got {raw[key]!r}")

    for key, (low, high) in INTS.items():
        if key in raw and not (_is_int(raw[key]) and low <= raw[key] <= high):
            fail(key, f"an integer from {low} to {high}")
    for key, (low, high) in NUMBERS.items():
        v = raw.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and low <= v <= high and (key != "max_macs_ratio" or v > 0)):
            fail(key, f"a number from {low:g} to {high:g}" + (", above 0" if key == "max_macs_ratio" else ""))
    for key in BOOLS:
        if key in raw and not isinstance(raw[key], bool):
            fail(key, "true or false")
    for key in STRINGS:
        if key in raw and not isinstance(raw[key], str):
            fail(key, "a string")
    if "batch_sizes" in raw and not (isinstance(raw["batch_sizes"], list) and raw["batch_sizes"] and
                                     all(_is_int(b) and 1 <= b <= MAX_BATCH for b in raw["batch_sizes"])):
        fail("batch_sizes", f"a non-empty list of integers from 1 to {MAX_BATCH}")
    lat = raw.get("latency_budget_ms")
    values = lat if isinstance(lat, list) else [lat]
    if lat is not None and (not values or not all(_positive(v) for v in values)):
        fail("latency_budget_ms", "a positive number of milliseconds, or a list of them, one per batch size")
    if raw.get("latency_binds", DEFAULT_BINDS) not in BINDS:
        fail("latency_binds", " or ".join(f'"{b}"' for b in BINDS))
    if "dla_core" in raw and not (_is_int(raw["dla_core"]) and 0 <= raw["dla_core"] <= 1):
        fail("dla_core", "0 or 1")
    if "profile" in raw and not isinstance(raw["profile"], list):
        fail("profile", "a list [min, opt, max]")


def targets_dirs() -> list[Path]:
    env = os.environ.get("EDGEFUSE_TARGETS")
    if env and not Path(env).is_dir():
        raise EdgefuseError(f"EDGEFUSE_TARGETS={env} is not a folder of target files")
    dirs = [Path(env)] if env else []
    return dirs + [Path.cwd() / "targets", Path(__file__).resolve().parent]


def available_targets() -> list[str]:
    return sorted({p.stem for d in targets_dirs() if d.is_dir() for p in d.glob("*.toml")})


def parse_target(name: str, text: str, source: str = "<string>") -> Target:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgefuseError(f"malformed target file {source}: {e}") from None
    known = {f.name for f in fields(Target)} - {"name", "source"}
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
    _check_values(raw, source)
    batches = raw.get("batch_sizes", [1])
    _validate(raw, source)
    raw["batch_sizes"] = tuple(batches)
    if isinstance(raw.get("latency_budget_ms"), list):
        if len(raw["latency_budget_ms"]) != len(batches):
            raise EdgefuseError(f"target file {source}: latency_budget_ms has {len(raw['latency_budget_ms'])} values "
                                f"for {len(batches)} batch sizes: give one, or one per batch size")
        raw["latency_budget_ms"] = tuple(raw["latency_budget_ms"])
    if "profile" in raw:
        raw["profile"] = tuple(raw["profile"])
    raw["precisions"] = tuple(raw.get("precisions") or [raw.get("precision", "fp32")])
    return Target(name=name, source=source, **raw)


def load_target(name: str) -> Target:
    """A target by name (a file in targets/) or by path to a .toml file."""
    path = Path(name)
    if path.suffix != ".toml":
        path = next((d / f"{name}.toml" for d in targets_dirs() if (d / f"{name}.toml").is_file()), path)
    if not path.is_file():
        raise EdgefuseError(f"unknown target '{name}' (available: {', '.join(available_targets()) or 'none'})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgefuseError(f"target file {path} is not UTF-8 text (byte {e.start}): TOML files are UTF-8") from None
    return parse_target(path.stem, text, str(path))
