"""`make gpu-check`: the export for a CUDA target on a GPU machine that has no package registry — the same
candidate layer and chooser as every export, each candidate timed with torch on the GPU (CUDA-graph replay at the
target's precision, CUDA events) instead of onnxruntime.

Runs with `PYTHONPATH=.` and no install step on a machine that has torch (CUDA), numpy, scipy, onnx, onnxruntime,
click, rich, matplotlib and safetensors: no onnxsim, no POT. Trained zoo weights are read from --cache (copy
build/cache there); Fashion-MNIST from the Debian package or build/data/fashion-mnist."""
from __future__ import annotations

import click
from rich.console import Console

from ..base.errors import EdgefuseError
from ..run.config import RunConfig
from .export import run_export


@click.command()
@click.option("--arch", default=RunConfig.arch, show_default=True,
              help="zoo architecture, its weights read from --cache")
@click.option("--n", "n", default=RunConfig.n, show_default=True, help="zoo members")
@click.option("--align", "method", default=RunConfig.methods[0], show_default=True, help="alignment method")
@click.option("--target", default="desktop-cuda", show_default=True)
@click.option("--cache", default=RunConfig.cache, show_default=True)
@click.option("--out", "out_root", default=RunConfig.out_root, show_default=True,
              help="the export goes to OUT/TARGET/")
def main(arch: str, n: int, method: str, target: str, cache: str, out_root: str) -> None:
    """Entry point of `make gpu-check`: errors a user can fix are one line and exit 1."""
    try:
        run_export(RunConfig(target=target, arch=arch, n=n, cache=cache, out_root=out_root, methods=(method,),
                             force=True), Console(stderr=True))
    except EdgefuseError as e:
        raise SystemExit(f"gpu-check: error: {e}") from None


if __name__ == "__main__":
    main()
