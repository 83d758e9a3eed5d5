"""The user's fine-tuning script: N copies of the pretrained network, each with a new head for the task's classes
(its own random init), fine-tuned on its own shard of `images/train` with its own seed and learning rate, saved to
checkpoints/.

    python train.py [-n 4] [--epochs 12]"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mynet import make_net

LEARNING_RATES = (1e-3, 5e-4, 2e-3, 7e-4)


def read_folder(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder split as tensors: sorted class folders, label = index, RGB in [0, 1]."""
    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted(c.iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = read_folder("images/train")
    shards = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).tensor_split(args.n)
    Path("checkpoints").mkdir(exist_ok=True)
    for i, shard in enumerate(shards):
        torch.manual_seed(i)
        net = make_net()
        net.load_state_dict(load_file("pretrained.safetensors"))
        net[-1].reset_parameters()  # a new head for the new classes, as fine-tuning recipes do
        fit(net, x[shard], y[shard], args.epochs, LEARNING_RATES[i % len(LEARNING_RATES)], seed=i)
        save_file(net.state_dict(), f"checkpoints/finetune{i}.safetensors")
        print(f"checkpoints/finetune{i}.safetensors: {len(shard)} images, lr {LEARNING_RATES[i % 4]:g}")


if __name__ == "__main__":
    main()
