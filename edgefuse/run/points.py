"""Jobs: build one candidate (a member, the distilled member, a fused point), export it and measure it — in this
process, in worker processes or on a Ray cluster. Finished points are stored one file each, so a sweep resumes;
fused points and distilled weights are kept in the cache folder (run/kept.py), so a second run builds neither
again."""
from __future__ import annotations

import copy
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.data import Splits
from ..graph.int8 import quantize_int8
from ..base.errors import EdgefuseError
from ..graph.onnx import export_onnx, onnx_nodes
from ..fuse import DistillConfig, distill, ensemble, fuse
from ..measure.cuda import CudaRunner
from ..measure.runners import latency_batch, peak_memory_mb
from ..spec.permspec import PermSpec, permutation_spec
from ..targets import Target
from .candidate import Candidate, Point, measure, with_agreement
from .forms import budget_macs, faster_form, in_form
from .kept import code_digest, fingerprint, kept_module, kept_state
from .stored import store_point, stored_point
from ..base.combine import DEFAULT_COMBINE


@dataclass
class Job:
    """What a worker needs to evaluate one point; plain data and modules, so it pickles to another process. The
    splits travel with the job (images on disk travel as file names), so no worker reads the source again."""
    point: Point
    aligned: list[nn.Module]
    splits: Splits
    target: Target  # opset, batch sizes, threads, runtime, batched heads, INT8's kept ends
    out_dir: str
    ensemble_predictions: np.ndarray
    distill: DistillConfig | None = None
    cache: str | None = None
    keep_module: bool = False
    teacher: tuple[int, ...] | None = None  # the members whose ensemble teaches distillation (None: all)
    teacher_combine: str = DEFAULT_COMBINE  # how that ensemble combines them
    spec: PermSpec | None = None  # traced once per run; None: traced here
    built: nn.Module | None = None  # the same point fused and repaired earlier in this run: distilled from a copy


def build(job: Job, splits, seconds: dict[str, float] | None = None) -> nn.Module:
    """The point's module: a member as it is, or the aligned models fused at the point (BN reset or REPAIR), then
    distilled towards their exact ensemble when the point says so. A depth split also outputs its heads' logits
    (head_logits), whose disagreement flags inputs not to trust. `seconds`, when given, gets each step's time."""
    p, t, seconds = job.point, time.perf_counter(), {} if seconds is None else seconds
    if p.kind == "member":
        if not 0 <= int(p.value) < len(job.aligned):
            raise EdgefuseError(f"there is no member {int(p.value)} among {len(job.aligned)} models")
        module = job.aligned[int(p.value)]
        module = copy.deepcopy(module) if p.distill else module
    elif job.built is not None:  # fusion and repair are deterministic: the module built before is this one
        module = copy.deepcopy(job.built)
    else:
        module, loaded = kept_module(_fused_path(job, splits), lambda: _fused(job, splits),
                                     lambda form: _layout(job, splits, form), splits.example)
        seconds["loaded" if loaded else "fuse and repair"] = time.perf_counter() - t
    if p.distill:
        if job.distill is None:
            raise EdgefuseError(f"{p.label}: no distillation budget was given")
        t = time.perf_counter()
        _distilled(module, job, splits)
        seconds["distill"] = time.perf_counter() - t
    return module.eval()


def fused_point(p: Point, aligned: list[nn.Module], spec: PermSpec, splits, target: Target,
                repair: bool = True) -> nn.Module:
    """A depth or α point fused as every run builds it: a depth split with its heads' outputs (batched where the
    target batches heads), repaired with the point's repair (`repair` False: as fusion lays it out, before any
    repair), before any choice of graph form."""
    kw = dict(depth=int(p.value)) if p.kind == "depth" else dict(alpha=p.value)
    return fuse(aligned, spec, data=splits.calib_batches, repair=p.repair if repair else None,
                batch_heads=p.kind == "depth" and target.batch_heads, head_outputs=p.kind == "depth", **kw)


def _fused(job: Job, splits, repair: bool = True) -> nn.Module:
    """The point fused and repaired (`repair` False: as fusion lays it out, before any repair)."""
    p = job.point
    spec = job.spec or permutation_spec(job.aligned[0], splits.example)
    module = fused_point(p, job.aligned, spec, splits, job.target, repair)
    if p.kind == "alpha" and repair:  # in the graph form that runs faster on the target (run/forms.py)
        module, module.form = faster_form(module, splits, job.target, Path(job.out_dir) / f".{p.key}-form",
                                          budget_macs(job.target, job.aligned, splits.example))
    return module


def _layout(job: Job, splits, form: str | None) -> nn.Module:
    """What a kept fused point's tensors load into: the point before repair, in the graph form it was kept in."""
    module = in_form(_fused(job, splits, repair=False), form)
    if form is not None:
        module.form = form
    return module


def _fused_path(job: Job, splits) -> Path | None:
    """Where a fused point is kept: keyed by the aligned models, the calibration images, the point, its form and
    the code that builds it."""
    if not job.cache:
        return None
    key = fingerprint(job.aligned, job.point.key, str(job.target.batch_heads), str(tuple(splits.example.shape)),
                      code_digest(), tensors=splits.calib_batches)
    return Path(job.cache) / "fused" / f"{key}.pt"


def _distilled(student: nn.Module, job: Job, splits) -> None:
    """Distil in place, or load the weights of an earlier run with the same models, point and budget."""
    cfg = job.distill
    key = fingerprint([*job.aligned, student], job.point.key, repr(cfg), job.splits.digest,  # the student as it
                      str(job.target.batch_heads), str(job.teacher),  # starts: its form and repaired weights
                      *(() if job.teacher_combine == DEFAULT_COMBINE else (job.teacher_combine,)))
    path = Path(job.cache) / "distilled" / f"{key}.pt" if job.cache else None
    members = job.aligned if job.teacher is None else [job.aligned[i] for i in job.teacher]

    def train() -> None:
        teacher = ensemble(members, combine=job.teacher_combine, head_outputs=cfg.per_head).fastest()
        distill(student, teacher, splits.x_train, cfg, label=job.point.label,
                quiet=multiprocessing.parent_process() is not None or None,
                targets=_teacher_pass(fingerprint(members, repr(cfg), job.splits.digest, job.teacher_combine)))

    kept_state(path, student, train, "distilled weights")


_TEACHER_PASS: dict[str, list] = {}


def _teacher_pass(key: str) -> list:
    """The teacher's outputs of this process's current run, one per distillation step: the students of one run
    (the best member, depth and alpha) draw the same batches, so the teacher runs for the first of them only. One
    run's worth is kept (about 2.5 MB for 500 steps of 128 × 10 logits)."""
    if key not in _TEACHER_PASS:
        _TEACHER_PASS.clear()
        _TEACHER_PASS[key] = []
    return _TEACHER_PASS[key]


def evaluate(job: Job) -> tuple[Candidate, nn.Module | None]:
    """Build, export and measure one point: scores on both splits, agreement with the ensemble, cost, latency and
    peak memory on the target's runtime."""
    if multiprocessing.parent_process() is not None:  # a worker: several share the cores
        torch.set_num_threads(max(1, job.target.threads))
    splits, seconds = job.splits, {}
    module = build(job, splits, seconds)
    p = job.point
    row = export_and_measure(module, splits, Path(job.out_dir) / f"{p.key}.onnx", job.target, p.precision,
                             Path(job.cache) if job.cache else None, key=p.key, label=p.label,
                             kind=p.row_kind, point=p, batched_heads=p.kind == "depth" and job.target.batch_heads,
                             distill=job.distill.describe() if p.distill else None, seconds=seconds,
                             form=getattr(module, "form", None) if p.kind == "alpha" else None)
    return with_agreement(row, job.ensemble_predictions), module if job.keep_module else None


def export_and_measure(module: nn.Module, splits, path: Path, target: Target, precision: str = "fp32",
                       cache: Path | None = None, **fields) -> Candidate:
    """One candidate as every candidate is measured: exported (parity-checked), run on both splits and timed at
    each batch size on the target's runtime — onnxruntime, its peak memory taken in a fresh process, or torch on the
    CUDA GPU for a `cuda` target. An INT8 candidate is the QDQ graph of that export, calibrated on training images
    only (first and last weighted layers kept in FP32 where the target says so), and measured the same way. The
    row's `seconds` adds the time its export and its measurement took to those given (building it). `cache`: the
    run's cache folder, where graphs exported before (onnx/, graph/onnx.py's export cache) and their outputs
    (scores/, run/kept.py) are kept."""
    t, graphs = time.perf_counter(), Path(cache) / "onnx" if cache else None
    if precision == "int8":
        fp32 = export_onnx(module, splits.example, path.with_name(f"{path.stem}-fp32.onnx"), opset=target.opset,
                           cache=graphs)
        q = quantize_int8(fp32, splits.x_train, path, target.int8_keep_ends)
        fp32.unlink()
        path, fields = q.path, fields | {"precision": "int8", "quantization": q.summary()}
    else:
        path = export_onnx(module, splits.example, path, opset=target.opset, cache=graphs)
    fields |= {"onnx_nodes": onnx_nodes(path)}
    seconds = fields.pop("seconds", None) or {}
    seconds["export"], t = time.perf_counter() - t, time.perf_counter()
    if target.runtime == "cuda":
        runner = CudaRunner(module, target.precision, graphs=True)
        big = latency_batch(splits.x_test, max(target.batch_sizes))
        row = measure(module, splits, path, target.batch_sizes, runner=runner, predictor=runner,
                      peak_memory_mb=runner.peak_memory_mb(big), **fields)
    else:
        row = measure(module, splits, path, target.batch_sizes, target.threads, cache=cache,
                      peak_memory_mb=peak_memory_mb([path], max(target.batch_sizes), target.threads), **fields)
    seconds["measure"] = time.perf_counter() - t
    return replace(row, seconds={k: round(v, 2) for k, v in seconds.items()})


def run_points(jobs: list[Job], workers: int = 0, ray_address: str | None = None, store: Path | None = None,
               key: str = "", progress=None) -> list[tuple[Candidate, nn.Module | None]]:
    """Evaluate every job, skipping those already stored under `store` with the same fingerprint `key` whose
    digests hold. workers=0 runs in this process; otherwise fresh spawned processes (one per point: clean memory,
    no state)."""
    done_rows: dict[str, tuple[Candidate, nn.Module | None]] = {}
    todo = []
    for job in jobs:
        saved = store / f"{job.point.key}.json" if store else None
        if saved and saved.is_file():
            row, why = stored_point(saved, key)
            if row is not None:
                done_rows[job.point.key] = (row, None)
                _advance(progress)
                continue
            if why and progress is not None:
                progress[0].console.print(f"[yellow]stored point {job.point.key}[/]: measured again, {why}")
        todo.append(job)

    def done(result: tuple[Candidate, nn.Module | None]) -> None:
        row = result[0]
        done_rows[row.key] = result
        if store:
            store_point(row, store, key)
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
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1,
                                 initializer=_leave_ctrl_c_to_the_parent) as pool:
            try:
                for f in as_completed([pool.submit(evaluate, job) for job in todo]):
                    done(f.result())
            except KeyboardInterrupt:  # stop the running points now and drop the queued ones: one line, no traces
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
                raise
    return [done_rows[job.point.key] for job in jobs]


def _leave_ctrl_c_to_the_parent() -> None:
    """A worker ignores SIGINT (Ctrl-C reaches the whole process group): the parent stops it, so an interrupted
    sweep says one line instead of a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
