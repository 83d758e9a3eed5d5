"""An α network's mixed layers as single dense layers where that costs few extra MACs. A mixed layer computes only
its non-zero blocks (fused units from every input; each member's isolated units from the fused inputs and its own
isolated ones) as two or three Linear/Conv calls joined by slices, an add and a concatenation. On a small network
those extra operators cost more than the zeros a single dense layer would multiply: the α 0.1 graph of the default
zoo ran 2.3× slower per MAC than a member at batch 1. Fused units read every input anyway, so where the isolated
share is small the dense layer adds few MACs (9 % on that zoo's widest layer at α 0.1) and runs as one kernel,
with its BatchNorm folded into it by onnxruntime. The function is unchanged: the dense weight holds the same
blocks, and zeros elsewhere."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import GroupedLinear, as_param
from .model import FusedModel
from .neuron import MixedLayer

DENSE_MAX = 1.25  # a mixed layer becomes dense where that multiplies at most this many more MACs than its blocks


def _blocks(layer: MixedLayer) -> tuple[torch.Tensor, torch.Tensor | None, int, int] | None:
    """The layer's weight as one dense tensor (out × in, then the kernel), its bias, and the MACs per output
    position of its blocks and of the dense form; None where the parts are not plain dense Linear/Conv layers."""
    fused, from_fused, from_isolated, split = layer.fused, layer.from_fused, layer.from_isolated, layer.split
    if fused is None or from_fused is None or getattr(fused, "groups", 1) != 1 or \
            getattr(from_fused, "groups", 1) != 1 or isinstance(fused, GroupedLinear):
        return None
    w_fused, w_from_fused = fused.weight.detach(), from_fused.weight.detach()
    n_in, kernel = w_fused.shape[1], w_fused.shape[2:]
    iso_out = w_from_fused.shape[0]
    rows = torch.zeros(iso_out, n_in, *kernel, dtype=w_fused.dtype)
    if split is None:  # a shared input: both parts read all of it
        rows.copy_(w_from_fused)
        structured = (w_fused.shape[0] + iso_out) * n_in
    else:
        rows[:, :split] = w_from_fused
        if from_isolated is not None:
            blocks = _isolated_blocks(from_isolated)
            if blocks is None:
                return None
            r = c = 0
            for block in blocks:
                rows[r:r + block.shape[0], split + c:split + c + block.shape[1]] = block
                r, c = r + block.shape[0], c + block.shape[1]
        own = sum(b.shape[1] * b.shape[0] for b in _isolated_blocks(from_isolated)) if from_isolated is not None \
            else 0
        structured = w_fused.shape[0] * n_in + iso_out * split + own
    weight = torch.cat([w_fused, rows])
    bias = _bias(fused, from_fused, from_isolated, iso_out)
    return weight, bias, structured, weight.shape[0] * n_in


def _isolated_blocks(layer: nn.Module) -> list[torch.Tensor] | None:
    """Each member's block of a block-diagonal layer (a grouped Conv, or a GroupedLinear), as out × in (× kernel)."""
    if isinstance(layer, GroupedLinear):
        return [w.t() for w in layer.weight.detach()]
    if isinstance(layer, nn.Conv2d | nn.Conv1d):
        return list(layer.weight.detach().chunk(layer.groups))
    return None


def _bias(fused: nn.Module, from_fused: nn.Module, from_isolated: nn.Module | None,
          iso_out: int) -> torch.Tensor | None:
    parts = [b.detach() for b in (from_fused.bias, getattr(from_isolated, "bias", None)) if b is not None]
    if fused.bias is None and not parts:
        return None
    iso = sum(parts) if parts else torch.zeros(iso_out)
    top = fused.bias.detach() if fused.bias is not None else torch.zeros(fused.weight.shape[0])
    return torch.cat([top, iso])


def _dense(first: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    new = copy.deepcopy(first)
    new.weight = as_param(weight.clone())
    new.bias = as_param(bias.clone()) if bias is not None else None
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape[:2]
    else:
        new.out_channels, new.in_channels = weight.shape[:2]
    return new


def densify(fused: FusedModel, limit: float = DENSE_MAX) -> int:
    """Make an α model's mixed layers single dense layers, in place, wherever that costs at most `limit`× their
    blocks' MACs (math.inf: every one that has a dense form); returns how many changed. The outputs stay equal up
    to rounding."""
    changed = 0
    for net in fused.heads:
        for name, layer in list(net.named_modules()):
            if not isinstance(layer, MixedLayer):
                continue
            blocks = _blocks(layer)
            if blocks is None or blocks[3] > limit * blocks[2]:
                continue
            net.set_submodule(name, _dense(layer.fused, blocks[0], blocks[1]))
            changed += 1
    return changed
