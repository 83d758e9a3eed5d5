"""Seconds to align N = 2, 4, 8 models per method, and the objective each reaches, for ResNet-20 (zoo, width 16)
and a ResNet-18-sized net (11 M parameters, torchvision's widths). Independent random inits with trained-like
BatchNorm: this measures time and the weight-matching objective, not merge quality (bench.py's MLP table does).

The objective is weight matching's: the sum over model pairs of <aligned_i, aligned_j> over the learned parameters;
the table shows its gain over the unaligned models (most of the raw value is BatchNorm scales, equal for all).
Run alone: python benchmarks/align_scaling.py (writes build/bench/align_scaling.json)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.align.weight import _float_params, similarity
from edgefuse.base.files import atomic_write_text
from edgefuse.spec.permspec import permute_state

METHODS = (("weight", {}), ("activation", {}), ("ot", {}), ("ot", {"reg": 0.05}))
NETS = (("resnet20", 16), ("resnet18", 64))


def _name(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Trained-like BatchNorm statistics and affine parameters, so every parameter kind enters the cost."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def objective(models: list[torch.nn.Module], spec, perms: list[dict]) -> float:
    states = [permute_state(_float_params(m, spec), spec, p) for m, p in zip(models, perms)]
    return sum(similarity(states[i], states[j]) for i in range(len(states)) for j in range(i))


def alignment_time(console: Console, sizes: tuple[int, ...] = (2, 4, 8)) -> dict:
    x = data.fashion_mnist("test")[0][:256]
    out: dict = {}
    for arch, width in NETS:
        models = []
        for seed in range(max(sizes)):
            torch.manual_seed(seed)
            models.append(_randomized(zoo.build(arch, width=width), seed))
        spec = ef.permutation_spec(models[0], x[:2])
        params = sum(p.numel() for p in models[0].parameters()) / 1e6
        table = Table(title=f"alignment: {arch} width {width} ({params:.1f} M parameters, {len(spec.groups)} groups), "
                            f"{torch.get_num_threads()} threads: seconds (objective gained)")
        table.add_column("method")
        for n in sizes:
            table.add_column(f"N={n}", justify="right")
        table.add_column(f"N={sizes[-1]} / N={sizes[-2]}", justify="right")
        rows: dict = {}
        for method, options in METHODS:
            opts = dict(options, data=data.batches(x, batch_size=64)) if method == "activation" else options
            cells = {}
            for n in sizes:
                history: list[float] = []
                extra = {"history": history} if method in ("weight", "ot") else {}
                t0 = time.perf_counter()
                perms = ef.align_perms(models[:n], spec, method, **opts, **extra)
                seconds = time.perf_counter() - t0
                reached = objective(models[:n], spec, perms)
                start = objective(models[:n], spec, [spec.identity_perms()] * n)
                cells[str(n)] = {"seconds": seconds, "objective": reached, "unaligned": start,
                                 "rounds": max(len(history) - 1, 0) if extra else None}
            rows[_name(method, options)] = cells
            last, before = cells[str(sizes[-1])]["seconds"], cells[str(sizes[-2])]["seconds"]
            table.add_row(_name(method, options), *(f"{c['seconds']:.2f} ({c['objective'] - c['unaligned']:.1f})"
                                                    for c in cells.values()), f"{last / before:.2f}")
        console.print(table)
        out[arch] = {"width": width, "params_millions": params, "groups": len(spec.groups), "methods": rows}
    return out


if __name__ == "__main__":
    result = alignment_time(Console(width=160))
    path = Path("build/bench/align_scaling.json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    sys.exit(0)
