"""Batched forms of the channel views a ShuffleNet uses: chunk/split along channels, and the channel shuffle (view
to (batch, groups, C/groups, …), transpose those two axes, view back). On a batched tensor [member 0 | member 1 | …]
each becomes the member's own operation with the members as an extra axis, so every member's channels stay in
its block."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..base.errors import UnsupportedModelError
from ..spec.trace import is_split

ARITHMETIC = {operator.floordiv, operator.mul, operator.truediv}


class ChannelViews:
    """Mixed into BatchRewriter (which provides emit, graph, n, batched and shape_of_batched)."""

    def init_views(self) -> None:
        self.member_count: set[fx.Node] = set()  # one member's channel count, or a number computed from it
        self.member_axis: set[fx.Node] = set()  # batched tensors viewed as (batch, N, groups, C/groups, …)
        self.member_parts: set[fx.Node] = set()  # the parts of a per-member chunk/split

    def _uses(self, a, nodes: set) -> bool:
        found: list = []
        fx.node.map_arg(a, lambda n: found.append(n in nodes))
        return any(found)

    def visit_view(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        """The batched form of a channel view, or None when `node` is none of them."""
        method, target = node.op == "call_method", node.target
        x = args[0] if args and isinstance(args[0], fx.Node) else None  # not the list a cat takes
        if target is operator.getitem and x in self.shape_of_batched and node.args[1] == 1:
            count = self.emit(node.op, target, args, kwargs, batched=False)
            out = self.graph.call_function(operator.floordiv, (count, self.n))
            self.member_count.add(out)
            return out
        if self._uses((args, kwargs), self.member_count):
            if target in ARITHMETIC:
                out = self.emit(node.op, target, args, kwargs, batched=False)
                self.member_count.add(out)
                return out
            if method and target in ("view", "reshape") and x in self.batched and len(args) >= 4 and \
                    isinstance(args[2], int) and args[3] in self.member_count:
                out = self.emit(node.op, target, (x, args[1], self.n, *args[2:]), {}, batched=True)
                self.member_axis.add(out)
                return out
            raise UnsupportedModelError(node.name, getattr(target, "__name__", str(target)),
                                        "uses the channel count of a batched tensor other than in a channel shuffle")
        if x in self.member_axis:
            if target is torch.transpose or (method and target == "transpose"):
                if sorted(args[1:3]) == [1, 2]:
                    out = self.emit(node.op, target, (x, 2, 3), {}, batched=True)
                    self.member_axis.add(out)
                    return out
            if method and target == "contiguous":
                out = self.emit(node.op, target, args, kwargs, batched=True)
                self.member_axis.add(out)
                return out
            if method and target in ("view", "reshape") and len(args) >= 3 and args[2] == -1:
                return self.emit(node.op, target, args, kwargs, batched=True)  # (batch, -1, …): member-major
            raise UnsupportedModelError(node.name, getattr(target, "__name__", str(target)),
                                        "a view of shuffled channels other than a channel shuffle")
        if x in self.batched and is_split(node):
            dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if dim == 1:
                per_member = self.graph.call_method("unflatten", (x, 1, (self.n, -1)))
                out = self.graph.create_node(node.op, target, (per_member, args[1]), {"dim": 2})
                self.member_parts.add(out)
                return out
        if target is operator.getitem and x in self.member_parts:
            part = self.graph.call_function(operator.getitem, (x, args[1]))
            return self.emit("call_method", "flatten", (part, 1, 2), {}, batched=True)
        return None
