"""Seconds to align N = 2, 4, 8 models per method, and the objective each reaches, for ResNet-20 (zoo, width 16)
and a ResNet-18-sized net (11 M parameters, torchvision's widths). Independent random inits with trained-like
BatchNorm: this measures time and the weight-matching objective, not merge quality (bench.py's MLP table does).

`scaling()` (`--scaling`): where weight matching's time goes as N grows — first pass, rounds until the stop rule,
seconds per round — for N = 2, 4, 8, 16 on the zoo's ResNet-18 and on a torchvision-style ResNet-18 written out below
(7×7 stem, max-pool, downsample shortcuts, in-place residual add, one ReLU module reused), random weights as
initialised, seeds 0..N-1, alignment seeds 0..2 (--seeds), torch threads as given (--threads, default 2: the
matrix products run on both cores; scipy's assignment solver on one). Each point is also run with the first pass
against models[0] alone (the schedule before the running-sum first pass), whose objective is reported as a ratio.

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
from torch import nn
from rich.table import Table

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.align.weight import _float_params, similarity
from edgefuse.base.files import atomic_write_text
from edgefuse.spec.permspec import permute_state


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, written the way torchvision writes it (torchvision itself does not import here)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    """torchvision's resnet18(num_classes=10) layout and initialisation, for 3 × 64 × 64 inputs here."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers.append(BasicBlock(planes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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


def scaling(console: Console, sizes: tuple[int, ...] = (2, 4, 8, 16), threads: int = 2, seeds: int = 3) -> dict:
    """Weight matching of N = sizes models of each ResNet-18, per alignment seed: seconds in all, in the first
    pass, rounds and seconds per round, the objective reached, each N's time as a ratio to the N before it, and
    the objective of the previous schedule (first pass against models[0]) in the same run, as a ratio."""
    from edgefuse.align.weight import Rounds, weight_matching

    torch.set_num_threads(threads)
    nets = {"zoo resnet18 (1×28×28)": (lambda: zoo.build("resnet18", width=64), (2, 1, 28, 28)),
            "torchvision-style resnet18 (3×64×64)": (ResNet18, (2, 3, 64, 64))}
    out: dict = {"threads": threads, "seeds": seeds}
    for name, (make, shape) in nets.items():
        models = []
        for seed in range(max(sizes)):
            torch.manual_seed(seed)
            models.append(make().eval())
        spec = ef.permutation_spec(models[0], torch.rand(shape))
        table = Table(title=f"weight matching, {name}: {threads} torch thread(s), alignment seeds 0-{seeds - 1}")
        for col in ("N", "seed", "seconds", "× previous N", "first pass s", "rounds", "s / round", "objective",
                    "anchored first pass: objective, rounds, s"):
            table.add_column(col, justify="right")
        rows: dict = {}
        for n in sizes:
            for seed in range(seeds):
                r = _run(weight_matching, models[:n], spec, seed, Rounds())
                old = _run(weight_matching, models[:n], spec, seed, Rounds(first="anchor"))
                before = rows.get(f"{n // 2} {seed}")
                r |= {"anchored": old, "objective_vs_anchored": r["objective"] / old["objective"],
                      "ratio_to_previous": r["seconds"] / before["seconds"] if before else None}
                rows[f"{n} {seed}"] = r
                table.add_row(str(n), str(seed), f"{r['seconds']:.2f}",
                              f"{r['ratio_to_previous']:.2f}" if before else "-", f"{r['first_pass_seconds']:.2f}",
                              str(r["rounds"]), f"{r['seconds_per_round']:.2f}" if r["rounds"] else "-",
                              f"{r['objective']:.1f}", f"{old['objective']:.1f} (×{r['objective_vs_anchored']:.5f}), "
                              f"{old['rounds']}, {old['seconds']:.2f}")
        console.print(table)
        out[name] = rows
    return out


def _run(weight_matching, models: list, spec, seed: int, rounds) -> dict:
    history: list[float] = []
    stamps: list[float] = []
    weight_matching(models, spec, seed=seed, rounds=rounds, history=history, stamps=stamps)
    n_rounds = len(history) - 1
    return {"seconds": stamps[-1] - stamps[0], "first_pass_seconds": stamps[1] - stamps[0], "rounds": n_rounds,
            "seconds_per_round": (stamps[-1] - stamps[1]) / n_rounds if n_rounds else None,
            "objective": history[-1]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scaling", action="store_true", help="only the weight-matching scaling table")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="alignment seeds per N (the scaling table)")
    args = ap.parse_args()
    console = Console(width=180)
    result = {"scaling": scaling(console, threads=args.threads, seeds=args.seeds)}
    if not args.scaling:
        result["methods"] = alignment_time(console)
    path = Path("build/bench/align_scaling.json")
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    sys.exit(0)
