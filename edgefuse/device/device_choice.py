"""`deploy.py --choose`: the device decides. Every candidate the host sent (bundle/candidates.json and one folder
each under candidates/) is built with the target's settings, checked against its golden outputs and timed at each
of the target's batch sizes; the most accurate on validation within the latency budget (the figure the target's
`latency_binds` names, mean or p99 per call, as on the host, at every batch size)
and the memory budget ships, with the host chooser's rule for ties: a candidate within NOISE_Z standard errors of
the most accurate on validation that is clearly faster (that figure at most FASTER of its at every batch size) wins, and
a fused pick gives way to a candidate of the manifest's plain kinds (members, distilled members, ensembles) that
ties with it and is not clearly slower.

Copied as-is into every deploy bundle beside deploy.py."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

try:  # in the package, and as a script's sibling in a bundle
    from ..base.files import EdgefuseError as LockError, exclusive, file_digest
    from .golden import DeployError, atomic_write, compare, percentiles, read_bundle, read_json
    from .runtimes import resolve
    from .stages import CascadeRunner, open_runner
    from ..base.tie_rule import NOISE_Z, Entry, pick as tie_pick, speed
except ImportError:
    from files import EdgefuseError as LockError, exclusive, file_digest
    from golden import DeployError, atomic_write, compare, percentiles, read_bundle, read_json
    from runtimes import resolve
    from stages import CascadeRunner, open_runner
    from tie_rule import NOISE_Z, Entry, pick as tie_pick, speed

MANIFEST = "candidates.json"


class NoFit(DeployError):
    """No candidate meets the budget: exit 2, nothing written."""


class NoMatch(DeployError):
    """No candidate's engine computes what its model computed on the host: exit 1, nothing written."""


def read_manifest(bundle: Path) -> dict:
    """The manifest, with every candidate's folder checked to lie inside the bundle."""
    if not (bundle / MANIFEST).is_file():
        raise DeployError(f"{bundle / MANIFEST} is missing: this bundle carries no candidates (a TensorRT "
                          "target's `edgefuse export` writes them)")
    manifest = read_json(bundle / MANIFEST, "candidate manifest")
    rows = manifest.get("candidates")
    if not isinstance(rows, list) or not rows:
        raise DeployError(f"{bundle / MANIFEST}: 'candidates' must be a non-empty list")
    root = bundle.resolve()
    for row in rows:
        folder = (bundle / str(row.get("folder", ""))).resolve() if isinstance(row, dict) else None
        acc = row.get("validation", {}).get("accuracy") if isinstance(row, dict) else None
        if folder is None or root not in folder.parents or not _number(acc, 0.0, 1.0) or not \
                isinstance(row.get("key"), str):
            raise DeployError(f"{bundle / MANIFEST}: every candidate needs a key, a folder inside the bundle and "
                              "a validation accuracy from 0 to 1")
        _check_digests(bundle, row)
    budget = manifest.get("latency_budget_ms") or {}
    if not isinstance(budget, dict) or not all(_number(v, 0.0, math.inf, open_low=True) for v in budget.values()):
        raise DeployError(f"{bundle / MANIFEST}: latency_budget_ms must map batch sizes to positive numbers of "
                          f"milliseconds, got {budget!r}")
    batches = manifest.get("batch_sizes")
    if not (isinstance(batches, list) and batches and all(isinstance(b, int) and b >= 1 for b in batches)):
        raise DeployError(f"{bundle / MANIFEST}: batch_sizes must be a non-empty list of positive integers, got "
                          f"{batches!r}")
    unknown = sorted(set(budget) - {str(b) for b in batches})
    if unknown:
        raise DeployError(f"{bundle / MANIFEST}: latency_budget_ms names batch size {unknown[0]}, which is not "
                          f"among the batch sizes timed ({', '.join(map(str, batches))})")
    memory = manifest.get("memory_budget_mb")
    if memory is not None and not _number(memory, 0.0, math.inf, open_low=True):
        raise DeployError(f"{bundle / MANIFEST}: memory_budget_mb must be a positive number, got {memory!r}")
    return manifest


def _number(v, low: float, high: float, open_low: bool = False) -> bool:
    """A finite number within [low, high] (low excluded with `open_low`); never a bool, NaN or infinity."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
            and not (open_low and v == low))


def _check_digests(bundle: Path, row: dict) -> None:
    """Every file the host wrote for a candidate (its graph(s), golden inputs, references) as the manifest records
    it: candidate folders swapped or edited after the export would otherwise each pass their own golden check and
    ship one graph under another's accuracy. A manifest without digests (an older bundle) is taken as it is."""
    for name, want in (row.get("sha256") or {}).items():
        path = bundle / row["folder"] / name
        if not path.is_file() or file_digest(path) != want:
            raise DeployError(f"{bundle / row['folder'] / name} is missing or does not match its digest in "
                              f"{MANIFEST} (candidate folders swapped or edited?)")


def latency_budget(manifest: dict, latency_ms: float | None) -> dict[str, float]:
    """One budget per batch size (of the figure `binds` names): `--latency-ms` for every batch size, else the
    target's budget, else none."""
    batches = [str(b) for b in manifest["batch_sizes"]]
    if latency_ms is not None:
        if not (math.isfinite(latency_ms) and latency_ms > 0):
            raise DeployError(f"--latency-ms must be a positive number of milliseconds, got {latency_ms}")
        return {b: float(latency_ms) for b in batches}
    return {str(b): float(v) for b, v in (manifest.get("latency_budget_ms") or {}).items()}


def _batch(x: np.ndarray, b: int) -> np.ndarray:
    return x[np.arange(b) % len(x)]


def measure(bundle: Path, row: dict, runtime: str, batches: list[int], seconds: float) -> dict:
    """Build, self-check and time one candidate on this device."""
    folder = bundle / row["folder"]
    target, x, references = read_bundle(folder)
    runner = open_runner(folder, target, runtime, bundle / "timing.cache")
    cascade = isinstance(runner, CascadeRunner)
    problems = compare(runner(x), references, target)
    latency = {str(b): percentiles(runner.latency(_batch(x, b), seconds), cascade) for b in batches}
    return {"key": row["key"], "label": row.get("label", row["key"]), "kind": row.get("kind"),
            "precision": row.get("precision"), "validation_accuracy": row["validation"]["accuracy"],
            "test_accuracy": row.get("test", {}).get("accuracy"), "macs": row.get("macs"),
            "ok": not problems, "problems": problems, "latency_ms": latency, "memory_mb": runner.memory_mb(),
            "engine": str(Path(row["folder"]) / "model.engine") if runtime != "onnxruntime" and not cascade else None,
            "engines": [str(Path(row["folder"]) / p / "model.engine") for p in (".", "stage2")]
            if runtime != "onnxruntime" and cascade else None}


def binds(manifest: dict) -> str:
    """The latency figure the budget binds, as the host's chooser reads it: the target's `latency_binds` (the
    expected cost per call, "mean", or the p99); a bundle written before the manifest carried it binds the p50."""
    return manifest.get("latency_binds", "p50")


def pick(measured: list[dict], manifest: dict, budget: dict[str, float]) -> tuple[dict, str]:
    """The most accurate fitting candidate on validation, or a clearly faster one that ties with it."""
    memory, stat = manifest.get("memory_budget_mb"), binds(manifest)

    def lat(m: dict, b: str) -> float:
        return m["latency_ms"][b]["expected" if stat == "mean" else stat]

    rows = {r["key"]: r for r in manifest["candidates"]}

    def entry(m: dict) -> Entry:
        return Entry(m["key"], m.get("kind", ""), m["validation_accuracy"], {b: lat(m, b) for b in m["latency_ms"]},
                     _network(rows.get(m["key"], {})))

    for m in measured:
        over = [b for b, v in budget.items() if lat(m, b) > v]
        m["fits"] = m["ok"] and not over and (memory is None or m["memory_mb"] is None or m["memory_mb"] <= memory)
        m["why_not"] = "outputs differ from its references" if not m["ok"] else \
            f"{stat} over budget at batch {', '.join(over)}" if over else \
            f"{m['memory_mb']:.1f} MB over the memory budget" if not m["fits"] else None
    pool = [m for m in measured if m["fits"]]
    if not pool:
        ok = [m for m in measured if m["ok"]]
        if not ok:
            raise NoMatch("no candidate's outputs match its references on this device")
        fastest = min(ok, key=lambda m: speed(entry(m)))
        b = next(iter(fastest["latency_ms"]))
        raise NoFit(f"no candidate fits the budget ({describe(budget, memory, stat)}); the fastest is "
                    f"{fastest['label']}: {stat} {lat(fastest, b):.3f} ms at batch {b}")
    by_key, entries = {m["key"]: m for m in measured}, [entry(m) for m in pool]
    rule = tie_pick(entries, entries, lambda a, b: rows.get(a, {}).get("tie_z", {}).get(b))
    best, chosen = by_key[rule.best.key], by_key[rule.chosen.key]
    reason = (f"the most accurate on validation ({best['validation_accuracy']:.4f}) of the {len(pool)} candidates "
              f"within the budget ({describe(budget, memory, stat)}) on this device")
    if rule.faster and rule.yielded is None:
        reason = (f"ties on validation with the most accurate fitting candidate, {best['label']} "
                  f"({rows[best['key']]['tie_z'][chosen['key']]:.1f} standard errors apart, under {NOISE_Z:g}), and "
                  f"is clearly faster here ({stat} {speed(rule.chosen) / speed(rule.best):.2f}× its, geometric mean "
                  "over batch sizes)")
    elif rule.yielded is not None:
        fused = by_key[rule.yielded.key]
        what = "fused model" if fused.get("kind") == "fused" else fused.get("kind")
        reason = (f"ties on validation with the {what} {fused['label']} and is not clearly slower here: a {what} "
                  f"ships only where it beats the members and ensembles beyond noise")
    return chosen, reason


def _network(row: dict) -> tuple | None:
    """The candidate's graph as the host described it (MACs, parameters, nodes, precision), where it did."""
    key = tuple(row.get(k) for k in ("macs", "params", "onnx_nodes", "precision"))
    return key if None not in key else None


def describe(budget: dict[str, float], memory: float | None, stat: str = "p50") -> str:
    parts = [", ".join(f"{stat} ≤ {v:g} ms at batch {b}" for b, v in budget.items()),
             f"memory ≤ {memory:g} MB" if memory is not None else ""]
    return "; ".join(p for p in parts if p) or "no budget"


def choose(bundle: Path, runtime: str = "auto", latency_ms: float | None = None, seconds: float = 3.0) -> dict:
    """Measure every candidate here, pick one, and write choice.json (and, on TensorRT, model.engine: the chosen
    candidate's engine) into the bundle; NoFit when none fits, with nothing written. One at a time per bundle."""
    try:  # two at once would time each other's engines (and, on TensorRT, write the same engines and cache)
        with exclusive(bundle / ".choose.lock", f"the bundle {bundle}"):
            return _choose(bundle, runtime, latency_ms, seconds)
    except LockError as e:
        raise DeployError(str(e)) from None


def _choose(bundle: Path, runtime: str, latency_ms: float | None, seconds: float) -> dict:
    manifest = read_manifest(bundle)
    budget = latency_budget(manifest, latency_ms)
    runtime = resolve(runtime)
    measured = []
    for row in manifest["candidates"]:
        if row.get("kind") == "cascade" and runtime == "trtexec":
            print(f"{row.get('label', row['key'])}: left out, a cascade needs the TensorRT Python bindings")
            continue
        m = measure(bundle, row, runtime, [int(b) for b in manifest["batch_sizes"]], seconds)
        lat = ", ".join(f"b{b} mean {v['mean']:.3f} ms, p50 {v['p50']:.3f}, p99 {v['p99']:.3f}"
                        for b, v in m["latency_ms"].items())
        print(f"{m['label']}: validation {m['validation_accuracy']:.4f}, {lat}"
              + (f", {m['memory_mb']:.1f} MB" if m["memory_mb"] is not None else "")
              + ("" if m["ok"] else f", MISMATCH {m['problems'][0]}"))
        measured.append(m)
    chosen, reason = pick(measured, manifest, budget)
    choice = {"runtime": runtime, "chosen": chosen["key"], "label": chosen["label"], "reason": reason,
              "host_choice": manifest.get("host_choice"), "budget": {"latency_ms": budget,
                                                                    "memory_mb": manifest.get("memory_budget_mb")},
              "timing": {"seconds_per_batch_size": seconds, "statistic": binds(manifest)}, "candidates": measured}
    if chosen["engine"]:
        staged = bundle / ".model.engine.tmp"
        shutil.copyfile(bundle / chosen["engine"], staged)
        staged.replace(bundle / "model.engine")
    atomic_write(bundle / "choice.json", (json.dumps(choice, indent=2) + "\n").encode())
    return choice
