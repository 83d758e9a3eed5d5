"""An α network's mixed convolutions as one branch per member. In the blocks form (fuse/neuron.py) a member's
isolated units are computed by two convolutions, one from the fused inputs and a grouped one from the isolated
inputs, joined by slices and an add; here each member's isolated units are one plain convolution over the fused
inputs and its own, gathered from the layer's input. The MACs are the blocks' exactly; the operators are a gather
and a convolution per member instead of two slices, two convolutions and an add per layer. On the default zoo's
random-weight CNNs (onnxruntime CPU, 1 thread, batch 1) this ran α 0.75 at 0.78× the blocks' latency and α 0.5 at
0.88×, and α 0.25 at 1.15×: which form is faster depends on the widths, so run/forms.py times it."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .model import FusedModel
from .neuron import MixedLayer


class BranchLayer(nn.Module):
    """A mixed convolution as its fused units' convolution and one convolution per member on that member's
    inputs (the fused ones, then its own), outputs laid out as the mixed layer lays them out."""

    def __init__(self, fused: nn.Module, branches: list[nn.Module], inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.fused, self.branches = fused, nn.ModuleList(branches)
        for i, index in enumerate(inputs):
            self.register_buffer(f"inputs{i}", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = [branch(x.index_select(1, getattr(self, f"inputs{i}"))) for i, branch in enumerate(self.branches)]
        return torch.cat([self.fused(x), *own], 1)


def _branch_layer(layer: MixedLayer) -> BranchLayer | None:
    """The branch form of a mixed Conv2d whose isolated units read both fused and own inputs; None for any other
    (a Linear, a shared input, a layer without fused units)."""
    fused, from_fused, from_isolated, split = layer.fused, layer.from_fused, layer.from_isolated, layer.split
    if split is None or not all(isinstance(m, nn.Conv2d) for m in (fused, from_fused, from_isolated)) or \
            fused.groups != 1 or from_fused.groups != 1:
        return None
    n = from_isolated.groups
    own, out = from_isolated.in_channels // n, from_isolated.out_channels // n
    branches, inputs = [], []
    for i in range(n):
        rows = slice(i * out, (i + 1) * out)
        conv = copy.deepcopy(from_fused)
        conv.weight = nn.Parameter(torch.cat([from_fused.weight[rows], from_isolated.weight[rows]], 1).detach())
        biases = [b[rows] for b in (from_fused.bias, from_isolated.bias) if b is not None]
        conv.bias = nn.Parameter(sum(biases).detach().clone()) if biases else None
        conv.in_channels, conv.out_channels = split + own, out
        branches.append(conv)
        inputs.append(torch.cat([torch.arange(split), split + i * own + torch.arange(own)]))
    return BranchLayer(copy.deepcopy(fused), branches, inputs)


def branch(fused: FusedModel) -> int:
    """Make an α model's mixed convolutions branch layers, in place; returns how many changed. The outputs stay
    equal up to rounding."""
    changed = 0
    for net in fused.heads:
        for name, layer in list(net.named_modules()):
            if isinstance(layer, MixedLayer) and (new := _branch_layer(layer)) is not None:
                net.set_submodule(name, new)
                changed += 1
    return changed
