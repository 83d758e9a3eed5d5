"""The least-squares repair's fits for alpha's isolated units: each member's isolated units of a layer read the
fused inputs and that member's own isolated inputs, and after the merged layers before them were re-solved their
original weights no longer fit what they read; they are re-solved towards their own member (see lsq.py)."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .layers import GroupedLinear
from .lsq import Fit
from .neuron import MixedLayer


def isolated_fits(layer: MixedLayer, n: int, name: str, units: torch.Tensor, bn: str | None,
                  owner: nn.Module) -> list[Fit]:
    """One fit per member for its isolated units of an alpha-fused layer: from the fused input channels and its
    own isolated ones, towards its own outputs. They read features the merged layers before them changed, so
    their original weights no longer fit."""
    parts = [m for m in (layer.from_fused, layer.from_isolated) if m is not None]
    if not parts or not len(units):
        return []
    width = len(units)
    start = layer.fused.weight.shape[0] if layer.fused is not None else 0
    split = layer.split
    own = layer.from_isolated.weight.shape[1] if layer.from_isolated is not None else 0  # inputs per member
    shared = split if split is not None else layer.from_fused.weight.shape[1]  # inputs every member reads
    out = []
    for i in range(n):
        select = None if split is None else torch.cat([torch.arange(split), split + i * own + torch.arange(own)])
        proxy = _proxy(parts[0], width, shared + own)
        out.append(Fit(proxy, (i,), name, units, bn, owner, source=layer, select=select,
                       write=_writer(layer, i, width, shared, n), channels=start + i * width))
    return out


def _proxy(like: nn.Module, out: int, inp: int) -> nn.Module:
    """A stand-alone Linear/Conv of `like`'s kind with these widths, to solve one member's isolated units in."""
    if isinstance(like, (nn.Linear, GroupedLinear)):
        return nn.Linear(inp, out)
    proxy = copy.deepcopy(like)
    proxy.weight = nn.Parameter(torch.zeros(out, inp, *like.weight.shape[2:]))
    proxy.in_channels, proxy.out_channels, proxy.groups = inp, out, 1
    return proxy


def _writer(layer: MixedLayer, i: int, width: int, shared: int, n: int) -> Callable[[nn.Module], None]:
    """Copies a solved proxy into member i's rows of the layer's parts: the columns of the fused inputs into
    `from_fused`, the rest into its block of `from_isolated`, the bias into the part that adds it."""
    rows = slice(i * width, (i + 1) * width)

    def write(proxy: nn.Module) -> None:
        w, b = proxy.weight.detach(), proxy.bias.detach()
        with torch.no_grad():
            if layer.from_fused is not None:
                layer.from_fused.weight[rows] = w[:, :shared]
            iso = layer.from_isolated
            if iso is not None:
                if isinstance(iso, GroupedLinear):
                    iso.weight[i] = w[:, shared:].T
                else:
                    iso.weight[rows] = w[:, shared:]
            holder = layer.from_fused if layer.from_fused is not None else iso
            if holder.bias is None:  # a bias for every member's isolated units; the others' blocks follow
                holder.bias = nn.Parameter(torch.zeros(n * width))
            holder.bias[rows] = b

    return write
