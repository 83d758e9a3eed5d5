"""Write an ImageFolder of the user's own kind: 32x32 colour PNGs of 5 classes (digits 0-4 from sklearn, each drawn
in a random colour on a random dark background), as train/<class>/<n>.png and test/<class>/<n>.png.

    python make_images.py DIR [--per-class N]"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CLASSES = ("zero", "one", "two", "three", "four")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=None, help="at most this many images per class and split")
    args = ap.parse_args()
    d = load_digits()
    rng = np.random.default_rng(0)
    keep = np.flatnonzero(d.target < len(CLASSES))
    cut = int(0.75 * len(keep))
    for split, idx in (("train", keep[:cut]), ("test", keep[cut:])):
        counts = dict.fromkeys(range(len(CLASSES)), 0)
        for i in idx:
            label = int(d.target[i])
            if args.per_class is not None and counts[label] >= args.per_class:
                continue
            grey = np.asarray(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32),
                                                                                               Image.BILINEAR))
            ink, paper = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.3, 3)
            rgb = (grey[..., None] / 255.0) * ink + (1 - grey[..., None] / 255.0) * paper
            folder = Path(args.out) / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(folder / f"{i}.png")
            counts[label] += 1
    print(f"wrote {args.out}/train and {args.out}/test")


if __name__ == "__main__":
    main()
