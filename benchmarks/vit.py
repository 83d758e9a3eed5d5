"""Vision Transformers. (1) The time weight matching takes to align 4 ViT-S/16-sized networks (12 blocks, 6 heads,
width 384, MLP 1536) and 4 ViT-B/16s (torchvision's VisionTransformer, random weights: what is timed is the
matching, not its quality): the spec, the first pass and each round. (2) The ViT zoo (4 × `--arch vit` on
Fashion-MNIST) through `edgefuse sweep` with repairs none and lsq: members, the exact ensemble, sub-ensembles,
cascades, every depth and the distilled member, each row's test accuracy and its MACs and p50 latency against the
exact ensemble of the same run. Writes build/bench/vit.json; each part's result is kept as it finishes
(build/bench/vit-*.json), so a stopped run resumes.

    python benchmarks/vit.py [--threads 2] [--skip-b16] [--skip-zoo]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from common import resumed, threads

import edgefuse as ef
from edgefuse.align.weight import weight_matching
from edgefuse.base.files import atomic_write_text

SIZES = {"ViT-S/16": dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
         "ViT-B/16": dict(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)}
OUT = Path("build/bench")


def vision_transformer():
    """torchvision's class, its C operators (built for another torch) replaced by an empty module; None without."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except Exception:  # not installed, or built for an incompatible torch
        return None
    return VisionTransformer


def matching_cost(name: str, n: int = 4) -> dict:
    make = vision_transformer()
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(make(image_size=224, patch_size=16, **SIZES[name]).eval())
    start = time.perf_counter()
    spec = ef.permutation_spec(models[0], torch.rand(1, 3, 224, 224))
    spec_s = time.perf_counter() - start
    stamps: list[float] = []
    weight_matching(models, spec, stamps=stamps)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"models": n, "params_each": sum(p.numel() for p in models[0].parameters()), "groups": len(spec.groups),
            "head_families": len(spec.families), "spec_s": round(spec_s, 2), "first_pass_s": round(steps[0], 2),
            "rounds_s": [round(s, 2) for s in steps[1:]], "total_s": round(stamps[-1] - stamps[0], 2)}


def zoo_rows(out_root: Path) -> dict:
    """The sweep's candidates, each as test accuracy and MACs and p50 (batch 1 and 32) over the exact ensemble's."""
    cmd = [str(Path(sys.executable).parent / "edgefuse"), "sweep", "--arch", "vit", "--repair", "none",
           "--repair", "lsq", "--out-root", str(out_root)]
    subprocess.run(cmd, check=True)
    report = json.loads((out_root / "cpu-ort" / "sweep" / "sweep.json").read_text())
    ens = report["ensemble"]

    def p50(row: dict, b: str) -> float:
        return row["latency_by_batch"][b]["p50"]

    return {"ensemble_test": ens["test"]["accuracy"], "shipped": report["shipped"]["label"],
            "rows": [{"label": c["label"], "kind": c["kind"], "test": round(c["test"]["accuracy"], 4),
                      "validation": round(c["validation"]["accuracy"], 4), "macs": round(c["macs"] / ens["macs"], 3),
                      **{f"p50_b{b}": round(p50(c, b) / p50(ens, b), 3) for b in ens["latency_by_batch"]}}
                     for c in report["candidates"]]}


def run(n_threads: int = 2, skip_b16: bool = False, skip_zoo: bool = False) -> dict:
    """Both parts (the make bench entry), printed as they finish and written to build/bench/vit.json."""
    result = {"threads": threads(n_threads), "matching": {}}
    if vision_transformer() is None:
        print("torchvision's VisionTransformer does not import here: alignment timing skipped")
    else:
        for name in SIZES:
            if name == "ViT-B/16" and skip_b16:
                continue
            slug = name.lower().replace("/", "")
            result["matching"][name] = resumed(OUT / f"vit-matching-{slug}.json", lambda: matching_cost(name))
            print(name, result["matching"][name])
    if not skip_zoo:
        result["zoo"] = resumed(OUT / "vit-zoo.json", lambda: zoo_rows(OUT / "vit"))
        for row in result["zoo"]["rows"]:
            print(row)
    atomic_write_text(OUT / "vit.json", json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-b16", action="store_true")
    ap.add_argument("--skip-zoo", action="store_true")
    args = ap.parse_args()
    run(args.threads, args.skip_b16, args.skip_zoo)


if __name__ == "__main__":
    main()
