"""ZipIt!-style merges (Stoica et al., ICLR 2024) against edgefuse's weight matching, on the zoo CNN: does merging
correlated features *within* one member, not only across members, fuse narrow networks better?

ZipIt! matches the members' features by the correlation of their activations on calibration data, like
activation matching, but a feature may be merged with another feature of its own model: the merged layer averages
each cluster's weights (merge matrix M) and the next layer reads each cluster's value wherever any of its members
was read (unmerge matrix U), which no permutation can express. Here the N·n features of one layer are zipped
greedily, pair by pair and most correlated first, in rounds that halve their number until n remain (two rounds
for N = 4, so every merged feature averages 4 of them); `within=False` allows only pairs with no model in common,
which leaves activation matching done greedily. Zipping the first k weight layers and reading the merged features
from each member's remaining layers is ZipIt!'s partial zip, edgefuse's depth k. Each result gets BN reset (its
BatchNorm statistics re-estimated on the 2,000 calibration images), as edgefuse's "bn" repair does; weight matching
is scored with BN reset and with the least-squares repair. This file holds the merge because it serves only this
evaluation: the package keeps weight matching and lsq (see docs/results.md for the verdict).

    python benchmarks/zipit.py [--partition all|iid|dirichlet:A] [--zoo-seed S ...] [--n 4]
    (1 torch thread; each zoo is kept in build/bench/zipit/, read back when asked again; writes
    build/bench/zipit.json; the table shows accuracy minus the mean member, mean ± std over the zoos)"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import torch
from torch import nn

import edgefuse as ef
from common import resumed, threads
from edgefuse.base.files import atomic_write_text
from edgefuse.fuse.lsq import NormalEquations, held_out, identity_bn
from edgefuse.fuse.model import FusedModel
from edgefuse.models.batchnorm import reset_bn
from edgefuse.models import data, zoo
from edgefuse.models.partition import Partition, parse_partition
from repairs import accuracy

WEIGHTED = (nn.Conv2d, nn.Linear)
REPAIRS = ("bn", "lsq")


def weight_layers(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, WEIGHTED)]


def feature_covariances(models: list[nn.Sequential], xs: list[torch.Tensor], layers: list[int]) -> list[torch.Tensor]:
    """For each hidden weight layer, the covariance of all N·n features (channel-wise, over images and positions)
    read where the next weight layer reads them (after the ReLU), accumulated batch by batch."""
    reads = [next(i for i in range(a, b) if isinstance(models[0][i], nn.ReLU)) for a, b in zip(layers, layers[1:])]
    sums: list = [None] * len(reads)
    count = [0] * len(reads)
    with torch.no_grad():
        for x in xs:
            feats: list[list[torch.Tensor]] = [[] for _ in reads]
            for m in models:
                h = x
                for i, module in enumerate(m[:reads[-1] + 1]):
                    h = module(h)
                    if i in reads:
                        feats[reads.index(i)].append(h.movedim(1, -1).reshape(-1, h.shape[1]).double())
            for j, f in enumerate(feats):
                rows = torch.cat(f, 1)
                s = (rows.sum(0), rows.T @ rows)
                sums[j] = s if sums[j] is None else (sums[j][0] + s[0], sums[j][1] + s[1])
                count[j] += len(rows)
    covs = []
    for (s1, s2), c in zip(sums, count):
        mean = s1 / c
        covs.append(s2 / c - torch.outer(mean, mean))
    return covs


def zip_features(cov: torch.Tensor, n_models: int, within: bool) -> torch.Tensor:
    """Merge matrix (n × N·n, rows average their cluster): greedy pairs by correlation of the clusters' mean
    features, most correlated first, in rounds until n clusters remain."""
    total = len(cov)
    width = total // n_models
    owner = torch.arange(total) // width
    clusters = [[i] for i in range(total)]
    while len(clusters) > width:
        merge = torch.zeros(len(clusters), total, dtype=torch.float64)
        for c, members in enumerate(clusters):
            merge[c, members] = 1 / len(members)
        cc = merge @ cov @ merge.T
        d = cc.diagonal().clamp_min(1e-12).sqrt()
        corr = cc / torch.outer(d, d)
        models = [set(owner[m].tolist()) for m in clusters]
        need = min(len(clusters) - width, len(clusters) // 2)
        pairs = [(float(corr[a, b]), a, b) for a in range(len(clusters)) for b in range(a + 1, len(clusters))]
        pairs.sort(reverse=True)
        taken: set[int] = set()
        chosen = []
        for allow_any in ((True,) if within else (False, True)):
            for _, a, b in pairs:
                if len(chosen) == need:
                    break
                if a in taken or b in taken or (not allow_any and models[a] & models[b]):
                    continue
                taken |= {a, b}
                chosen.append((a, b))
        clusters = [clusters[a] + clusters[b] for a, b in chosen] + [c for i, c in enumerate(clusters) if i not in taken]
    merge = torch.zeros(width, total, dtype=torch.float64)
    for c, members in enumerate(sorted(clusters)):
        merge[c, members] = 1 / len(members)
    return merge


def _read(weight: torch.Tensor, unmerge: torch.Tensor | None, spatial: int) -> torch.Tensor:
    """A layer's weight reading merged features: its input axis contracted with the model's block of U (each
    channel of a flatten covers `spatial` positions, channel-major)."""
    if unmerge is None:
        return weight
    if weight.dim() == 4:
        return torch.einsum("oihw,iz->ozhw", weight, unmerge)
    w = weight.reshape(len(weight), len(unmerge), spatial)
    return torch.einsum("ois,iz->ozs", w, unmerge).reshape(len(weight), -1)


def zip_models(models: list[nn.Sequential], depth: int, within: bool,
               covs: list[torch.Tensor]) -> tuple[FusedModel, list[torch.Tensor]]:
    """The first `depth` weight layers zipped into one trunk; each member's remaining layers as a head. Also
    returns each zipped layer's merge matrix."""
    n = len(models)
    layers = weight_layers(models[0])
    trunk = copy.deepcopy(models[0])
    unmerge, spatial, merges = None, 1, []
    for d in range(depth):
        start = layers[d]
        end = layers[d + 1]
        merge = zip_features(covs[d], n, within).float()
        merges.append(merge)
        width = merge.shape[0]
        blocks = merge.reshape(width, n, -1)
        new = sum(torch.einsum("oc,c...->o...", blocks[:, k], _read(
            m[start].weight.detach(), None if unmerge is None else unmerge[k], spatial)) for k, m in enumerate(models))
        with torch.no_grad():
            trunk[start].weight.copy_(new)
            if trunk[start].bias is not None:
                trunk[start].bias.copy_(sum(blocks[:, k] @ m[start].bias for k, m in enumerate(models)))
            for i in range(start + 1, end):
                if isinstance(trunk[i], nn.modules.batchnorm._BatchNorm):
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(trunk[i], name).copy_(sum(blocks[:, k] @ getattr(m[i], name)
                                                          for k, m in enumerate(models)))
        unmerge = [(blocks[:, k] > 0).float().T for k in range(n)]
        spatial = _spatial(models[0], end)
    cut = layers[depth]
    heads = []
    for k, m in enumerate(models):
        head = copy.deepcopy(m[cut:])
        with torch.no_grad():
            head[0].weight = nn.Parameter(_read(m[cut].weight.detach(), unmerge[k], spatial))
        heads.append(head)
    return FusedModel(trunk[:cut], heads).eval(), merges


def zip_lsq(fused: FusedModel, models: list[nn.Sequential], merges: list[torch.Tensor],
            xs: list[torch.Tensor]) -> FusedModel:
    """edgefuse's least-squares repair, with ZipIt!'s targets: each zipped layer, in order, re-solved so that its
    (BatchNorm-normalised) output matches its merge matrix applied to the members' outputs, then each head's first
    layer so that it reproduces its own member from the trunk's features; a BatchNorm so folded in becomes the
    identity."""
    layers = weight_layers(models[0])
    n = len(models)

    def output_at(module: nn.Sequential, i: int) -> int:
        return i + 1 if i + 1 < len(module) and isinstance(module[i + 1], nn.modules.batchnorm._BatchNorm) else i

    blocks = [merge.reshape(len(merge), n, -1) for merge in merges]  # one (merged × member's units) block each
    jobs = [(fused.trunk, start, lambda x, start=start: fused.trunk[:start](x),
             lambda x, block=block, start=start: sum(_mix(block[:, k], m[:output_at(m, start) + 1](x))
                                                     for k, m in enumerate(models)))
            for block, start in zip(blocks, layers)]
    cut = layers[len(merges)]
    jobs += [(head, 0, lambda x: fused.trunk(x), lambda x, m=m: m[:output_at(m, cut) + 1](x))
             for head, m in zip(fused.heads, models)]
    with torch.no_grad():
        for owner, i, source, target in jobs:
            system = NormalEquations(owner[i], len(xs))
            for b, x in enumerate(xs):
                system.add(source(x), target(x), held_out(b, len(xs)))
            system.write()
            if output_at(owner, i) != i:
                bn = owner[i + 1]
                identity_bn(bn, slice(0, bn.num_features))
    return fused


def _mix(merge: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A merge matrix block applied to one member's output along its channel axis."""
    return torch.einsum("oc,bc...->bo...", merge, out)


def _spatial(model: nn.Sequential, index: int) -> int:
    """Positions per channel of the input to module `index` once flattened (1 for a conv's input)."""
    if isinstance(model[index], nn.Conv2d):
        return 1
    return model[index].in_features // _channels(model, index)


def _channels(model: nn.Sequential, index: int) -> int:
    prev = [m for m in model[:index] if isinstance(m, WEIGHTED)][-1]
    return prev.out_channels if isinstance(prev, nn.Conv2d) else prev.out_features


def _zipped(models: list[nn.Sequential], depth: int, within: bool, covs: list[torch.Tensor], xs: list[torch.Tensor],
            repair: str) -> FusedModel:
    fused, merges = zip_models(models, depth, within, covs)
    return reset_bn(fused, xs) if repair == "bn" else zip_lsq(fused, models, merges, xs)


def measure_zoo(partition: Partition, n: int = 4) -> dict:
    """Every depth of one zoo: weight and activation matching (edgefuse's) and both zips, with BN reset and lsq."""
    models, _ = zoo.zoo_models("cnn", n, quiet=True, partition=partition)
    s = data.load_dataset("fashion-mnist")
    xs = s.calib_batches
    spec = ef.permutation_spec(models[0], s.example)
    aligned = {"weight": ef.align(models, spec), "activation": ef.align(models, spec, "activation", data=xs)}
    members = [accuracy(m, s.x_val, s.y_val) for m in models]
    covs = feature_covariances(models, xs, weight_layers(models[0]))
    rows = []
    for depth in range(1, len(weight_layers(models[0]))):
        row = {"depth": depth}
        candidates = {f"{method} matching, {repair}": (lambda a=a, repair=repair: ef.fuse(a, spec, depth=depth,
                                                                                           repair=repair, data=xs))
                      for method, a in aligned.items() for repair in REPAIRS}
        candidates |= {f"zip {'within too' if within else 'across members'}, {repair}":
                       (lambda within=within, repair=repair: _zipped(models, depth, within, covs, xs, repair))
                       for within in (False, True) for repair in REPAIRS}
        for name, make in candidates.items():
            t0 = time.perf_counter()
            fused = make()
            row[name] = {"accuracy": accuracy(fused, s.x_val, s.y_val), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{partition.describe()}, depth {depth}:",
              {k: round(v["accuracy"], 4) for k, v in row.items() if k != "depth"}, flush=True)
    return {"partition": partition.describe(), "seed": partition.seed, "members": members,
            "mean_member": sum(members) / n, "rows": rows}


def table(zoos: list[dict]) -> str:
    """Validation accuracy minus the zoo's mean member, mean ± standard deviation over the zoos, per depth."""
    names = [k for k in zoos[0]["rows"][0] if k != "depth"]
    out = ["| depth | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for d, _ in enumerate(zoos[0]["rows"]):
        cells = []
        for name in names:
            gaps = np.array([z["rows"][d][name]["accuracy"] - z["mean_member"] for z in zoos])
            cells.append(f"{gaps.mean():+.4f} ± {gaps.std(ddof=1) if len(gaps) > 1 else 0:.4f}")
        out.append(f"| {d + 1} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def run(partition: str = "all", zoo_seeds: tuple[int, ...] = (0,), n: int = 4) -> dict:
    """Every zoo, the table (printed), and build/bench/zipit.json."""
    threads(1)
    zoos = []
    for seed in zoo_seeds:
        p = replace(parse_partition(partition), seed=seed)
        path = Path("build/bench/zipit") / f"{p.kind}{p.value:g}-n{n}-s{seed}.json"
        zoos.append(resumed(path, lambda: measure_zoo(p, n)))  # zoos can run side by side; a stopped run resumes
    result = {"n": n, "split": "validation (5,000 images)", "torch_threads": 1, "zoos": zoos, "table": table(zoos)}
    atomic_write_text(Path("build/bench/zipit.json"), json.dumps(result, indent=1) + "\n")
    print(result["table"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--partition", default="all", help="the zoo's training data: all (the default zoo), iid, "
                                                        "dirichlet:A or classes:K")
    ap.add_argument("--zoo-seed", type=int, action="append", help="zoo seeds (default: 0)")
    args = ap.parse_args()
    run(args.partition, tuple(args.zoo_seed or [0]), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
