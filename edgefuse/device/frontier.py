"""The candidates a TensorRT target's device chooses among: the host measures accuracy, the device measures
latency. Those on the accuracy-for-MACs frontier go in the bundle (members' best, sub-ensembles, the batched exact
ensemble, fused and distilled points, INT8 twins where the target weighs INT8), each as the graph the device
builds, statically checked; deploy.py --choose times them there and ships the best that fits."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from torch import nn

from ..graph.fp16 import export_fp16
from ..run.candidate import Candidate
from ..run.choose import frontier, per_batch_latency, tie_z
from ..targets import Target
from .check import check_onnx

FRONTIER_CAP = 6  # engines built and timed on the device: a handful keeps --choose to a few minutes on a Jetson
ONE_GRAPH = ("member", "distilled member", "sub-ensemble", "fused", "merge")  # and ensemble_batched; not N sessions


@dataclass(frozen=True)
class DeviceCandidate:
    """One candidate as it travels to the device: its row, its module (None for an INT8 graph, whose references
    come from onnxruntime's INT8 run), the graph file the device builds and what kind of graph that is."""
    row: Candidate
    module: nn.Module | None
    file: Path
    graph: str  # "fp32" (FP16 by the builder flag on an FP16 target), "fp16" (strongly typed), "int8", or
    # "cascade" (`file` its first stage, the second in the row's cascade["stages"]; FP32 graphs)
    shipped: bool = False  # the host's own choice, model.onnx at the bundle's root


def device_candidates(rows: list[Candidate], modules: dict[str, nn.Module], target: Target, example, out_dir: Path,
                      chosen: Candidate, console: Console) -> list[DeviceCandidate]:
    """The frontier (with the host's choice always among it) as device graphs; one that would not build is left
    out with a line saying why."""
    pool = [c for c in rows if c.file and (c.kind in ONE_GRAPH or c.key == "ensemble_batched"
                                           or c.kind == "cascade" and not target.strongly_typed)
            and (c.precision == "int8" or c.key in modules)]
    binds = target.latency_binds
    picked = frontier(pool, FRONTIER_CAP, binds)
    if chosen.key in {c.key for c in pool} - {c.key for c in picked}:
        kept = {c.key: c for c in [*frontier(pool, FRONTIER_CAP - 1, binds), chosen]}  # chosen may be in now
        picked = sorted(kept.values(), key=lambda c: c.cost_macs(binds))
    out = []
    for c in picked:
        if c.kind == "cascade":
            dc = DeviceCandidate(c, modules[c.key], Path(c.cascade["stages"][0]), "cascade")
        elif c.precision == "int8":
            dc = DeviceCandidate(c, None, Path(c.file), "int8")
        elif target.strongly_typed:
            path = out_dir / "candidates" / f"{c.key}-fp16.onnx"
            dc = DeviceCandidate(c, modules[c.key], export_fp16(modules[c.key], example, path, target.opset,
                                                                target.io_precision), "fp16")
        else:
            dc = DeviceCandidate(c, modules[c.key], Path(c.file), "fp32")
        dc = replace(dc, shipped=c.key == chosen.key)
        files = c.cascade["stages"] if dc.graph == "cascade" else [dc.file]
        errors = [e for f in files for e in check_onnx(Path(f), target).errors]
        if not errors:
            out.append(dc)
        else:
            console.print(f"[yellow]device candidates[/]: {c.label} left out, it will not build: {errors[0]}")
    return out


def manifest(candidates: list[DeviceCandidate], target: Target) -> dict:
    """candidates.json: what the device needs to choose (budgets, each candidate's validation accuracy, its graph
    and its paired z against every other; the rule itself travels as tie_rule.py) and what it reports (test
    accuracy, MACs, parameters)."""
    rows = []
    for dc in candidates:
        c = dc.row
        z = {o.row.key: tie_z(c, o.row) for o in candidates if o is not dc}
        rows.append({"key": c.key, "label": c.label, "kind": c.kind, "precision": c.precision, "graph": dc.graph,
                     "validation": c.validation, "test": c.test, "macs": c.macs, "params": c.params,
                     "onnx_nodes": c.onnx_nodes, "members": list(c.members) if c.members else None,
                     "folder": f"candidates/{c.key}",
                     "golden": f"candidates/{c.key}/reference_outputs.npz",
                     "tie_z": {k: v for k, v in z.items() if v is not None},
                     **({"cascade": {k: c.cascade[k] for k in ("first", "rest", "gate", "threshold", "combine",
                                                               "escalated", "macs_worst")}}
                        if c.cascade else {})})
    return {"target": target.name, "batch_sizes": list(target.batch_sizes),
            "latency_budget_ms": per_batch_latency(target, target.latency_budget_ms),
            "memory_budget_mb": target.memory_budget_mb, "latency_binds": target.latency_binds,
            "host_choice": host_choice(candidates), "candidates": rows}


def host_choice(candidates: Iterable[DeviceCandidate]) -> str | None:
    """The key of the candidate the host shipped as model.onnx, when it went to the device."""
    return next((dc.row.key for dc in candidates if dc.shipped), None)
