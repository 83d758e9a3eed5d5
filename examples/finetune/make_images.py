"""Two ImageFolders of the user's kind, 32x32 colour PNGs of sklearn's digits (each drawn in a random colour on a
random dark background): `pretrain/` holds digits 0-4 (the task the pretrained network learnt), `images/` digits 5-9
(the user's task, train/ and test/).

    python make_images.py [--per-class N]"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=None, help="at most this many images per class and split")
    args = ap.parse_args()
    d = load_digits()
    rng = np.random.default_rng(0)
    task = np.flatnonzero(d.target >= 5)
    cut = int(0.75 * len(task))
    for folder, idx in (("pretrain/train", np.flatnonzero(d.target < 5)),
                        ("images/train", task[:cut]), ("images/test", task[cut:])):
        counts: dict[int, int] = {}
        for i in idx:
            label = int(d.target[i])
            if args.per_class is not None and counts.get(label, 0) >= args.per_class:
                continue
            grey = np.asarray(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32),
                                                                                               Image.BILINEAR))
            ink, paper = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.3, 3)
            rgb = (grey[..., None] / 255.0) * ink + (1 - grey[..., None] / 255.0) * paper
            out = Path(folder) / NAMES[label]
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(out / f"{i}.png")
            counts[label] = counts.get(label, 0) + 1
    print("wrote pretrain/train (digits 0-4) and images/train, images/test (digits 5-9)")


if __name__ == "__main__":
    main()
