"""Where each permutation group's units sit on a tensor's channel axis, and how channel operations move them: cat,
flatten, chunk and channel shuffle. Pure functions over segments; the tracer decides what to do when a group must be
cut in two (`Cut`) or when a layout cannot be followed (`LayoutError`)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Seg(NamedTuple):
    """`units` units of `group` on a channel axis: unit u occupies entries [start + u·stride, … + repeat). Contiguous
    when stride = repeat; a channel shuffle interleaves (stride > repeat); `repeat` > 1 after a flatten."""
    group: str
    units: int
    repeat: int = 1
    start: int = 0
    stride: int = 1

    def firsts(self) -> np.ndarray:
        return self.start + np.arange(self.units) * self.stride

    def positions(self) -> np.ndarray:
        """(units, repeat): the entries of every unit."""
        return self.firsts()[:, None] + np.arange(self.repeat)


Segments = tuple  # of Seg: a tensor's channel axis


class Cut(Exception):
    """The layout needs groups cut in two: (group, unit) pairs, each unit strictly inside its group."""

    def __init__(self, cuts: list[tuple[str, int]]) -> None:
        super().__init__(cuts)
        self.cuts = cuts


class LayoutError(ValueError):
    """A channel operation whose effect on the units cannot be followed."""


def contiguous(pieces: list[tuple[str, int]], offset: int = 0) -> Segments:
    out = []
    for group, units in pieces:
        out.append(Seg(group, units, 1, offset, 1))
        offset += units
    return tuple(out)


def shift(segs: Segments, offset: int) -> Segments:
    return tuple(s._replace(start=s.start + offset) for s in segs)


def flatten(segs: Segments, spatial: int) -> Segments:
    """(batch, C, H, W) → (batch, C·H·W): every entry becomes `spatial` consecutive ones."""
    return tuple(s._replace(repeat=s.repeat * spatial, start=s.start * spatial, stride=s.stride * spatial)
                 for s in segs)


def _breaks(values: np.ndarray) -> list[int]:
    return [int(k) for k in np.nonzero(values[1:] != values[:-1])[0] + 1]


def take(segs: Segments, lo: int, hi: int) -> Segments:
    """The entries [lo, hi) (a chunk or split along channels). A group with units on both sides must be cut."""
    out, cuts = [], []
    for s in segs:
        pos = s.positions()
        inside = (pos >= lo) & (pos < hi)
        if not inside.any():
            continue
        if not (inside.all(1) | ~inside.any(1)).all():
            raise LayoutError("a channel split falls inside the entries of one unit (after a flatten)")
        cuts += [(s.group, k) for k in _breaks(inside[:, 0])]
        out.append(s._replace(start=int(pos[inside[:, 0]][0, 0]) - lo))
    if cuts:
        raise Cut(cuts)
    return tuple(out)


def shuffle(segs: Segments, groups: int, width: int) -> Segments:
    """Channel shuffle (view to (batch, groups, width/groups, …), swap those two axes, view back): entry
    j·m + i moves to i·groups + j, m = width/groups. A group spanning two of the `groups` chunks must be cut."""
    m, out, cuts = width // groups, [], []
    for s in segs:
        if s.repeat != 1:
            raise LayoutError("channel shuffle after a flatten")
        chunk = s.firsts() // m
        cuts += [(s.group, k) for k in _breaks(chunk)]
        j = int(chunk[0])
        out.append(s._replace(start=(s.start - j * m) * groups + j, stride=s.stride * groups))
    if cuts:
        raise Cut(cuts)
    return tuple(out)


def _entries(segs: Segments, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per entry: the index of its segment and its unit (−1 where none)."""
    seg, unit = np.full(width, -1), np.full(width, -1)
    for i, s in enumerate(segs):
        pos = s.positions()
        if pos.size and (pos.min() < 0 or pos.max() >= width):
            raise LayoutError("channels laid out beyond the tensor's width")
        seg[pos.reshape(-1)] = i
        unit[pos.reshape(-1)] = np.repeat(np.arange(s.units), s.repeat)
    return seg, unit


def correspond(a: Segments, b: Segments, width: int) -> list[tuple[str, str]]:
    """The group pairs that two tensors combined entry by entry (an add, a shared parameter axis) tie together, unit
    u to unit u. Groups whose units meet units of two groups, or out of order, must be cut first."""
    sa, sb = sorted(a, key=lambda s: s.start), sorted(b, key=lambda s: s.start)
    if [s[1:] for s in sa] == [s[1:] for s in sb]:  # the same layout: the common case, no entry maps needed
        return [(x.group, y.group) for x, y in zip(sa, sb)]
    ia, ua = _entries(a, width)
    ib, ub = _entries(b, width)
    if (ia < 0).any() or (ib < 0).any():
        raise LayoutError("combines tensors whose channels are laid out differently")
    cuts = []
    for mine, their_seg, their_unit, theirs in ((a, ib, ub, b), (b, ia, ua, a)):
        for s in mine:
            first = s.firsts()
            partner, unit = their_seg[first], their_unit[first]
            if any(theirs[j].repeat != s.repeat for j in set(partner.tolist())):
                raise LayoutError("combines tensors whose channels are laid out differently "
                                  "(a flatten on one side only)")
            steps = (partner[1:] != partner[:-1]) | (unit[1:] != unit[:-1] + 1)
            cuts += [(s.group, int(k)) for k in np.nonzero(steps)[0] + 1]
    if cuts:
        raise Cut(cuts)
    pairs = []
    for s in a:
        t = b[ib[s.start]]
        if ub[s.start] != 0 or t.units != s.units:
            raise LayoutError("combines tensors whose channels are laid out differently")
        pairs.append((s.group, t.group))
    return pairs
