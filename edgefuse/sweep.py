"""The sweep: fusion depths, alpha values (and alignment methods on request) as independent candidates, each fused,
exported and measured — in this process, in local worker processes, or on a Ray cluster — then the most accurate
one that fits the target's budget is chosen. Finished candidates are stored one file each, so a sweep resumes."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EdgefuseError
from .files import atomic_write_text

DEFAULT_ALPHAS = (0.1, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Point:
    """One candidate of the grid: a depth split (`kind="depth"`) or neuron-level fusion (`kind="alpha"`)."""
    kind: str
    value: float
    method: str = "weight"
    repair: str | None = "bn"

    @property
    def key(self) -> str:
        return f"{self.method}-{self.kind}{self.value:g}-{self.repair or 'none'}"

    @property
    def label(self) -> str:
        what = f"depth {int(self.value)}" if self.kind == "depth" else f"alpha {self.value:g}"
        extra = [x for x in (self.method if self.method != "weight" else "",
                             f"repair {self.repair}" if self.repair != "bn" else "") if x]
        return what + (f" ({', '.join(extra)})" if extra else "")


def grid(n_cuts: int, alphas=DEFAULT_ALPHAS, methods=("weight",), repairs=("bn",)) -> list[Point]:
    """Every depth from 1 to the full merge and every alpha, for each alignment method and repair."""
    return [Point(kind, float(v), m, r) for m in methods for r in repairs
            for kind, values in (("depth", range(1, n_cuts + 1)), ("alpha", alphas)) for v in values]


@dataclass
class Job:
    """What a worker needs to evaluate one point; plain data and modules, so it pickles to another process."""
    point: Point
    aligned: list[nn.Module]
    dataset: str
    opset: int
    batch_sizes: tuple[int, ...]
    threads: int
    batch_heads: bool
    out_dir: str
    ensemble_predictions: np.ndarray
    distill_steps: int = 600
    keep_module: bool = False


def evaluate(job: Job) -> dict:
    """Fuse, export, and measure one point: scores, agreement with the ensemble, cost, latency, peak memory."""
    from . import data as datasets
    from .export import export_onnx, onnx_nodes
    from .fuse import fuse
    from .pipeline import load_dataset
    from .runtime import peak_memory_mb
    from .spec import permutation_spec
    from .verify import measure, public

    if multiprocessing.parent_process() is not None:  # a worker: several share the cores
        torch.set_num_threads(max(1, job.threads))
    calib, x_test, y_test = load_dataset(job.dataset)
    spec = permutation_spec(job.aligned[0], x_test[:2])
    p = job.point
    kw = dict(depth=int(p.value)) if p.kind == "depth" else dict(alpha=p.value)
    batched = p.kind == "depth" and job.batch_heads
    fused = fuse(job.aligned, spec, data=datasets.batches(calib, batch_size=200), repair=p.repair,
                 batch_heads=batched, steps=job.distill_steps, **kw)
    path = export_onnx(fused, x_test[:2], Path(job.out_dir) / f"{p.key}.onnx", opset=job.opset)
    row = measure(fused, x_test, y_test, path, batch_sizes=job.batch_sizes, threads=job.threads)
    row["agreement"] = float((row["predictions"] == job.ensemble_predictions).mean())
    row |= {"point": asdict(p), "key": p.key, "label": p.label, "depth": int(p.value) if p.kind == "depth" else None,
            "alpha": p.value if p.kind == "alpha" else None, "file": str(path), "onnx_nodes": onnx_nodes(path),
            "batched_heads": batched,
            "peak_memory_mb": peak_memory_mb([path], max(job.batch_sizes), job.threads)}
    return public(row) | {"module": fused} if job.keep_module else public(row)


def fingerprint(aligned: list[nn.Module], *parts: str) -> str:
    """Identity of a sweep's inputs: resumed points are reused only when models, data and target are the same."""
    h = hashlib.sha256("\0".join(parts).encode())
    for m in aligned:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_points(jobs: list[Job], workers: int = 1, ray_address: str | None = None, store: Path | None = None,
               key: str = "", progress=None) -> list[dict]:
    """Evaluate every job, skipping those already stored under `store` with the same fingerprint `key`.
    workers=0 runs in this process; otherwise fresh spawned processes (one per point: clean memory, no state)."""
    rows: dict[str, dict] = {}
    todo = []
    for job in jobs:
        saved = store / f"{job.point.key}.json" if store else None
        if saved and saved.is_file():
            got = json.loads(saved.read_text())
            if got.pop("fingerprint", None) == key:
                rows[job.point.key] = got
                _advance(progress)
                continue
        todo.append(job)

    def done(row: dict) -> None:
        rows[row["key"]] = row
        if store:
            atomic_write_text(store / f"{row['key']}.json", json.dumps(row | {"fingerprint": key}, indent=1))
        _advance(progress)

    if not todo:
        pass
    elif ray_address:
        _run_ray(todo, ray_address, done)
    elif workers == 0:
        for job in todo:
            done(evaluate(job))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            futures = [pool.submit(evaluate, job) for job in todo]
            for f in as_completed(futures):
                done(f.result())
    return [rows[job.point.key] for job in jobs]


def _run_ray(jobs: list[Job], address: str, done) -> None:
    try:
        import ray
    except ImportError:
        raise EdgefuseError("--ray needs Ray: pip install 'edgefuse[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(evaluate)
    pending = [remote.remote(job) for job in jobs]
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        done(ray.get(finished[0]))


def _advance(progress) -> None:
    if progress is not None:
        progress[0].advance(progress[1])


def choose(candidates: list[dict], exact: dict[str, dict], latency_ms: float | None = None,
           memory_mb: float | None = None, max_drop: float | None = None, max_macs_ratio: float | None = None,
           batch: str | None = None) -> dict:
    """The most accurate candidate within the budget (p50 latency at `batch`, peak memory, MACs share), or with
    `max_drop` the fastest within that accuracy drop from the ensemble. Exact ensembles compete too: a fused model
    is never chosen over an exact ensemble that fits the budget and is at least as fast."""
    ens = exact["ensemble"]
    batch = batch or next(iter(ens["latency_by_batch"]))
    pool = [dict(r, label=r.get("label", name)) for name, r in exact.items() if "file" in r] + list(candidates)

    def p50(r: dict) -> float:
        return r["latency_by_batch"][batch]["p50"]

    def fits(r: dict) -> bool:
        return ((latency_ms is None or p50(r) <= latency_ms)
                and (memory_mb is None or r.get("peak_memory_mb", 0.0) <= memory_mb)
                and (max_macs_ratio is None or r["macs"] <= max_macs_ratio * ens["macs"] or r.get("label") in exact))

    fastest_exact = min(p50(r) for r in exact.values())
    ok = [r for r in pool if fits(r) and (r.get("label") in exact or p50(r) < fastest_exact)]
    if max_drop is not None:
        ok = [r for r in ok if r["accuracy"] >= ens["accuracy"] - max_drop]
    if not ok:
        cheapest = min(pool, key=p50)
        limits = ", ".join(s for s in (f"p50 ≤ {latency_ms} ms" if latency_ms is not None else "",
                                       f"memory ≤ {memory_mb} MB" if memory_mb is not None else "",
                                       f"accuracy drop ≤ {max_drop}" if max_drop is not None else "") if s)
        raise EdgefuseError(f"no candidate meets the budget ({limits or 'MACs share'}); the cheapest is "
                            f"{cheapest['label']}: p50 {p50(cheapest):.3f} ms at batch {batch}, "
                            f"{cheapest.get('peak_memory_mb', float('nan')):.1f} MB, accuracy "
                            f"{cheapest['accuracy']:.4f}")
    if max_drop is not None:
        return min(ok, key=lambda r: (p50(r), -r["accuracy"]))
    return max(ok, key=lambda r: (r["accuracy"], -p50(r)))


def run_sweep(target: str = "cpu-ort", models: list[nn.Module] | None = None, arch: str = "cnn", n: int = 4,
              dataset: str = "fashion-mnist", out_root: str | Path = "build", cache: str | Path = "build/cache",
              methods: tuple[str, ...] = ("weight",), alphas: tuple[float, ...] = DEFAULT_ALPHAS,
              repairs: tuple = ("bn",), latency_ms: float | None = None, memory_mb: float | None = None,
              max_drop: float | None = None, workers: int = 1, ray_address: str | None = None, steps: int = 600,
              console=None) -> dict:
    """Measure the grid and choose within the budget (the target's unless given); writes
    out_root/<target>/sweep/{sweep.json, sweep.md, pareto.png, points/, candidates/}. Re-running resumes."""
    from rich.console import Console

    from .pipeline import baselines, candidates, prepare
    from .targets import load_target
    from .verify import best_exact, markdown, mean_rows, pareto_plot, public

    console = console or Console(stderr=True)
    tgt = load_target(target)
    if tgt.runtime == "cuda":
        raise EdgefuseError(f"target '{tgt.name}' is measured by make gpu-check, not by a sweep")
    out = Path(out_root) / tgt.name / "sweep"
    (out / "points").mkdir(parents=True, exist_ok=True)
    s = prepare(models, arch, n, dataset, cache, tuple(methods), console)
    singles, exact = baselines(s.models, s.x_test, s.y_test, tgt, out / "candidates")
    key = fingerprint(s.models, Path(tgt.source).read_text(), dataset, str(steps))
    points = grid(len(s.spec.cut_points), alphas, methods, repairs)
    rows = candidates(s, tgt, points, out / "candidates", exact["ensemble"]["predictions"], console, workers,
                      ray_address, out / "points", key, steps)
    latency_ms = latency_ms if latency_ms is not None else tgt.latency_budget_ms
    memory_mb = memory_mb if memory_mb is not None else tgt.memory_budget_mb
    budgeted = latency_ms is not None or memory_mb is not None or max_drop is not None
    chosen = choose(rows, exact, latency_ms, memory_mb, max_drop, None if budgeted else tgt.max_macs_ratio)
    sweep = {
        "target": tgt.name, "arch": s.label, "n_models": len(s.models), "dataset": dataset, "n_test": len(s.x_test),
        "threads": tgt.threads, "batch_sizes": list(tgt.batch_sizes), "batched_heads": tgt.batch_heads,
        "max_depth": len(s.spec.cut_points), "align_method": ", ".join(methods), "align_seconds": s.align_seconds,
        "budget": {"latency_ms": latency_ms, "memory_mb": memory_mb, "max_drop": max_drop,
                   "max_macs_ratio": None if budgeted else tgt.max_macs_ratio},
        "depth": chosen.get("depth"), "alpha": chosen.get("alpha"),
        "single": mean_rows(singles), **{name: public(r) for name, r in exact.items()},
        "baseline_by_batch": best_exact(exact), "fused": public(chosen),
        "candidates": [public(exact["ensemble"]) | {"label": "ensemble"}] + rows,
    }
    atomic_write_text(out / "sweep.json", json.dumps(sweep, indent=2) + "\n")
    atomic_write_text(out / "sweep.md", markdown(sweep))
    pareto_plot(sweep, out / "pareto.png")
    return sweep
