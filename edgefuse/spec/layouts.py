"""Where a tensor's channels sit when they are not on axis 1: channels-last tensors (a transformer's tokens, a
ConvNeXt block), a channel axis viewed as (heads, head width) on two axes, the three parts of a packed QKV projection
stacked on one axis, and attention scores, which carry only the head axis. Each layout says how an axis permutation
(permute, transpose) moves it; the tracer's token visits (tokens.py) decide what each operation does to it."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .channels import Segments


@dataclass(frozen=True)
class Tokens:
    """Channels on the last axis of a tensor of `ndim` ≥ 3 axes, e.g. (batch, tokens, C)."""
    segs: Segments
    ndim: int

    def channel_axis(self) -> int:
        return self.ndim - 1


@dataclass(frozen=True)
class Heads:
    """One group's C = heads × width channels viewed on two axes: head h is units [h·width, (h+1)·width)."""
    segs: Segments
    heads: int
    head_axis: int
    dim_axis: int
    ndim: int

    def moved(self, order: list[int]) -> Heads:
        return replace(self, head_axis=order.index(self.head_axis), dim_axis=order.index(self.dim_axis))


@dataclass(frozen=True)
class Stacked:
    """A packed projection's output viewed as (…, parts, heads, width, …): `parts` (Q, K, V) on `stack_axis`."""
    parts: tuple[Segments, ...]
    heads: int
    stack_axis: int
    head_axis: int
    dim_axis: int
    ndim: int

    def moved(self, order: list[int]) -> Stacked:
        return replace(self, stack_axis=order.index(self.stack_axis), head_axis=order.index(self.head_axis),
                       dim_axis=order.index(self.dim_axis))

    def part(self, k: int) -> Heads:
        """Part k, the stack axis removed."""
        def drop(a: int) -> int:
            return a - (a > self.stack_axis)
        return Heads(self.parts[k], self.heads, drop(self.head_axis), drop(self.dim_axis), self.ndim - 1)


@dataclass(frozen=True)
class Scores:
    """Attention weights (…, heads, queries, keys): the head axis moves with `group`'s head permutation (`heads` 1
    for single-head attention, which has no head axis)."""
    group: str
    heads: int
    head_axis: int | None
    ndim: int

    def moved(self, order: list[int]) -> Scores:
        return replace(self, head_axis=None if self.head_axis is None else order.index(self.head_axis))


class Parts:
    """The value of a chunk, split, unbind or attention module: the layout of each part, picked by getitem."""

    def __init__(self, parts: list) -> None:
        self.parts = parts


LAYOUTS = (Tokens, Heads, Stacked, Scores)


def axis_order(ndim: int, dims: tuple) -> list[int] | None:
    """permute(dims) as a list of old axes in their new order; None if `dims` is not a permutation of ndim axes."""
    order = [d % ndim for d in dims if isinstance(d, int)]
    return order if len(order) == ndim and sorted(order) == list(range(ndim)) else None


def swap(ndim: int, a: int, b: int) -> list[int]:
    """transpose(a, b) as a permutation order."""
    order = list(range(ndim))
    order[a % ndim], order[b % ndim] = order[b % ndim], order[a % ndim]
    return order
