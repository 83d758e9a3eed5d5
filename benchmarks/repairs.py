"""Repairs before any distillation: validation accuracy of every fused depth and of alpha 0.25 / 0.5 on the zoo
(4 members of one architecture, Fashion-MNIST, weight matching or --align's method), with BN reset, REPAIR and the
least-squares repair (and each one's MACs as a share of the ensemble's), next to the mean member measured in the
same run; 1 torch thread.

    python benchmarks/repairs.py [cnn|resnet20|...] [--n 4] [--align weight|activation|ot] [--repair lsq ...]"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import edgefuse as ef
from edgefuse.base.files import atomic_write_text
from edgefuse.models import data, zoo

REPAIRS = ("bn", "repair", "lsq")
ALPHAS = (0.25, 0.5)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).double().mean())


def repairs_table(arch: str, n: int = 4, cache: str = "build/cache", align: str = "weight",
                  repairs: tuple[str, ...] = REPAIRS) -> dict:
    torch.set_num_threads(1)
    models, _ = zoo.zoo_models(arch, n, cache=cache, quiet=True)
    s = data.load_dataset("fashion-mnist")
    spec = ef.permutation_spec(models[0], s.example)
    aligned = ef.align(models, spec, align, data=s.calib_batches)
    members = [accuracy(m, s.x_val, s.y_val) for m in models]
    ensemble_macs = ef.macs(ef.ensemble(models), s.example[:1])
    rows = []
    points = [{"depth": d} for d in range(1, len(spec.cut_points) + 1)] + [{"alpha": a} for a in ALPHAS]
    for point in points:
        row = {"point": point}
        for repair in repairs:
            t0 = time.perf_counter()
            fused = ef.fuse(aligned, spec, data=s.calib_batches, repair=repair, **point)
            row[repair] = {"accuracy": accuracy(fused, s.x_val, s.y_val),
                           "seconds": round(time.perf_counter() - t0, 1),
                           "macs_ratio": round(ef.macs(fused, s.example[:1]) / ensemble_macs, 4)}
        rows.append(row)
        print(point, {r: round(row[r]["accuracy"], 4) for r in repairs}, flush=True)
    return {"arch": arch, "n": n, "align": align, "split": "validation (5,000 images)", "members": members,
            "mean_member": sum(members) / n, "rows": rows, "torch_threads": 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arch", nargs="?", default="cnn")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--align", default="weight", help="alignment method (weight, activation, ot)")
    ap.add_argument("--repair", action="append", choices=REPAIRS, help="only these repairs (default: all)")
    ap.add_argument("--out-root", default="build/bench")
    args = ap.parse_args()
    result = repairs_table(args.arch, args.n, align=args.align, repairs=tuple(args.repair or REPAIRS))
    only = "" if args.repair is None else "_" + "-".join(args.repair)
    path = Path(args.out_root) / f"repairs_{args.arch}_{args.align}{only}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"mean member {result['mean_member']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
