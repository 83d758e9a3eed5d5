"""The user's own training script: N models of mynet.make_net from different seeds, on the ImageFolder's training
split; two saved as .pt state dicts, the rest as safetensors (edgefuse reads both).

    python train.py DIR [-n 3] [--epochs 8]"""
import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

import edgefuse as ef
from mynet import make_net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default="checkpoints")
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = ef.load_data(args.data)
    x, y = splits.x_train[:], splits.y_train
    Path(args.out).mkdir(exist_ok=True)
    for seed in range(args.n):
        torch.manual_seed(seed)
        net = make_net()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(args.epochs):
            for idx in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(splits.x_val).argmax(1) == splits.y_val).float().mean().item()
        path = Path(args.out) / (f"seed{seed}.pt" if seed < 2 else f"seed{seed}.safetensors")
        if path.suffix == ".pt":
            torch.save(net.state_dict(), path)
        else:
            save_file(net.state_dict(), path)
        print(f"{path}: validation accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
