"""Layers of the member-axis rewrite (stacked.py): N members' layers as one layer over (N, …) tensors, and the
functions its graphs call where an operation needs members and samples as one batch axis."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..base.errors import UnsupportedModelError
from ..spec.trace import SDPA
from .layers import as_param


class StackedLinear(nn.Module):
    """N Linear layers as one MatMul with weights (N, in, out); an unstacked input broadcasts to every member."""

    def __init__(self, linears: list[nn.Linear], stacked_input: bool) -> None:
        super().__init__()
        self.n, self.stacked_input = len(linears), stacked_input
        self.weight = as_param(torch.stack([m.weight.detach().t() for m in linears]).contiguous())
        self.bias = as_param(torch.stack([m.bias.detach() for m in linears])) if linears[0].bias is not None else None

    @property
    def inputs_per_output(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The weight's member axis lines up with x's (or leads x's batch axes when x is shared); the bias then
        broadcasts over every axis between the member axis and the features."""
        batch = x.dim() - (3 if self.stacked_input else 2)  # x's batch axes after the member axis
        out = torch.matmul(x, self.weight.reshape(self.n, *[1] * batch, *self.weight.shape[1:]))
        return out if self.bias is None else out + self.bias.reshape(self.n, *[1] * (out.dim() - 2), -1)


class StackedLayerNorm(nn.Module):
    """N LayerNorms over the last axis: the normalisation is the same for every member, the affine is per member."""

    def __init__(self, norms: list[nn.LayerNorm], stacked_input: bool, node: str) -> None:
        super().__init__()
        first = norms[0]
        if len(first.normalized_shape) != 1:
            raise UnsupportedModelError(node, "LayerNorm", "only LayerNorm over one axis is stacked")
        self.n, self.shape, self.eps, self.stacked_input = len(norms), first.normalized_shape, first.eps, stacked_input
        affine = first.weight is not None
        self.weight = as_param(torch.stack([m.weight.detach() for m in norms])) if affine else None
        self.bias = as_param(torch.stack([m.bias.detach() for m in norms])) if first.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.shape, eps=self.eps)
        between = x.dim() - (2 if self.stacked_input else 1)
        if self.weight is not None:
            y = y * self.weight.reshape(self.n, *[1] * between, -1)
        return y if self.bias is None else y + self.bias.reshape(self.n, *[1] * between, -1)


class StackedAttention(nn.Module):
    """N nn.MultiheadAttention layers (self-attention, no masks) as one: Q, K and V of every member by one batched
    MatMul, attention over members and samples as one batch axis, the output projections as one StackedLinear.
    Returns (output, None), as the layer does with need_weights=False."""

    def __init__(self, layers: list[nn.MultiheadAttention], stacked_input: bool, node: str) -> None:
        super().__init__()
        first = layers[0]
        if not first._qkv_same_embed_dim or first.bias_k is not None or first.add_zero_attn:
            raise UnsupportedModelError(node, "MultiheadAttention", "attention with separate key/value widths, "
                                        "bias_k/bias_v or add_zero_attn has no stacked form")
        self.n, self.heads, self.batch_first, self.stacked_input = len(layers), first.num_heads, first.batch_first, \
            stacked_input
        self.in_proj = StackedLinear([_as_linear(m.in_proj_weight, m.in_proj_bias) for m in layers], True)
        self.out_proj = StackedLinear([m.out_proj for m in layers], True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if not self.stacked_input:
            x = expand_members(x, self.n)
        if not self.batch_first:  # (N, T, B, E) → (N, B, T, E)
            x = x.transpose(1, 2)
        t, e = x.shape[2], x.shape[3]
        q, k, v = self.in_proj(x).reshape(-1, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = self.out_proj(SDPA(q, k, v).transpose(1, 2).reshape(self.n, -1, t, e))
        return (y if self.batch_first else y.transpose(1, 2)), None


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = as_param(weight.detach().clone())
    if bias is not None:
        layer.bias = as_param(bias.detach().clone())
    return layer


class ChannelMajor(nn.Module):
    """A conv (or BatchNorm) over N members' channels side by side on axis 1, between stacked tensors."""

    def __init__(self, layer: nn.Module, n: int, stacked_input: bool) -> None:
        super().__init__()
        self.layer, self.n, self.stacked_input = layer, n, stacked_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked_input:
            x = x.movedim(0, 1).flatten(1, 2)
        return split_axis(self.layer(x), 1, self.n).movedim(1, 0)


class PerSample(nn.Module):
    """A layer that sees one sample at a time (a pooling): the member and batch axes as one batch axis."""

    def __init__(self, layer: nn.Module, n: int) -> None:
        super().__init__()
        self.layer, self.n = layer, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_axis(self.layer(x.flatten(0, 1)), 0, self.n)


def per_sample(fn, x: torch.Tensor, n: int, *args, **kwargs) -> torch.Tensor:
    return split_axis(fn(x.flatten(0, 1), *args, **kwargs), 0, n)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, *args, **kwargs) -> torch.Tensor:
    return split_axis(SDPA(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *args, **kwargs), 0, n)


def split_axis(x: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """unflatten(axis, (n, -1)) as a reshape of x's own sizes: after an unflatten the TorchScript exporter fixes
    the batch size that later reads of the shape see (a class token expanded to it), after a reshape it does not."""
    return x.reshape(*x.shape[:axis], n, -1, *x.shape[axis + 1:])


def expand_members(x: torch.Tensor, n: int) -> torch.Tensor:
    """(…) → (n, …) without reading x's shape: -1 keeps every axis, so an exported graph keeps its dynamic batch."""
    return x.unsqueeze(0).expand(n, *[-1] * x.dim())


def align_param(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Members' parameters (N, *shape) viewed to broadcast against a stacked tensor x (N, …): ones between the member
    axis and the parameter's own axes, as broadcasting would insert them in front of *shape for one member."""
    return p.reshape(p.shape[0], *[1] * (x.dim() - p.dim()), *p.shape[1:])
