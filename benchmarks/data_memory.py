"""Large data stays on disk: a generated ImageFolder of full-size JPEGs (default 20,000 training images, 224x224
RGB, 5 classes), read with `ef.load_data`, then a student distilled towards a teacher on batches decoded from the
files. Reports, from a fresh process, the peak RSS against the size the training split would take as one float32
tensor (validation and test, 500 and 1,000 images here, are held in memory: every candidate runs them), and the
images per second while distilling (1 torch thread; edgefuse's 4 decoding threads).

    python benchmarks/data_memory.py [--images 20000] [--steps 40] [--out-root build/bench]"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 5
SIZE = 224


def generate(folder: Path, n_train: int, n_test: int) -> None:
    """Smooth colour images (a gradient and a disc whose place depends on the class) saved as JPEG, once."""
    from PIL import Image, ImageDraw

    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{n_train} {n_test}":
        return
    splits = (("train", n_train), ("val", n_test // 2), ("test", n_test))
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, SIZE, dtype=np.float32)
    for split, n in splits:
        for i in range(n):
            label = i % CLASSES
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            rgb = (c0 * ramp[:, None, None] + c1 * (1 - ramp[None, :, None])).astype(np.uint8)
            img = Image.fromarray(np.broadcast_to(rgb, (SIZE, SIZE, 3)).copy(), "RGB")
            cx, cy = 40 + 36 * label, int(rng.integers(40, SIZE - 40))
            ImageDraw.Draw(img).ellipse((cx - 30, cy - 30, cx + 30, cy + 30), fill=tuple(rng.integers(0, 255, 3)))
            out = folder / split / f"class{label}"
            out.mkdir(parents=True, exist_ok=True)
            img.save(out / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n_train} {n_test}")


def net():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 7, stride=4, padding=3), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def measure(folder: Path, steps: int) -> dict:
    """In this (fresh) process: read the folder, distil, report peak RSS and throughput."""
    import torch

    import edgefuse as ef
    from edgefuse.fuse import DistillConfig, distill

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    splits = ef.load_data(str(folder))
    load_s = time.perf_counter() - t0
    cfg = DistillConfig(steps=steps, batch_size=128)
    t0 = time.perf_counter()
    distill(net(), net().eval(), splits.x_train, cfg, quiet=True)
    distill_s = time.perf_counter() - t0
    n = len(splits.x_train)
    return {"train_images": n, "val_images": len(splits.x_val), "test_images": len(splits.x_test),
            "input_shape": list(splits.input_shape),
            "load_seconds": round(load_s, 1), "distill_steps": steps, "batch_size": cfg.batch_size,
            "images_per_second": round(steps * cfg.batch_size / distill_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_imports_mb": round(base_mb, 1),
            "train_split_as_one_tensor_mb": round(n * 3 * SIZE * SIZE * 4 / 2**20, 1),
            "torch_threads": 1}


def data_memory(out_root: Path, images: int = 20_000, steps: int = 40) -> dict:
    folder = out_root / "jpegs"
    generate(folder, images, max(100, images // 20))
    res = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out-root", default="build/bench")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.steps)))
        return 0
    result = data_memory(Path(args.out_root), args.images, args.steps)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
