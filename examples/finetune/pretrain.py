"""Stands in for the pretrained checkpoint a user downloads or already has: mynet trained once on `pretrain/`
(digits 0-4), saved as pretrained.safetensors.

    python pretrain.py [--epochs 10]"""
import argparse

import torch
from safetensors.torch import save_file

from mynet import make_net
from train import fit, read_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(100)
    x, y = read_folder("pretrain/train")
    net = fit(make_net(), x, y, args.epochs, lr=3e-3, seed=100)
    save_file(net.state_dict(), "pretrained.safetensors")
    print(f"pretrained.safetensors: {len(x)} images of digits 0-4, {args.epochs} epochs")


if __name__ == "__main__":
    main()
