"""Give every tensor of a traced model the permutation groups of its channel axis, and union the groups that an
operation ties together: the walk over the fx graph, and the operations on hidden channels (element-wise ops, cat,
chunk, flatten, channel shuffle). The layers themselves are in group_layers.py."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .channels import Cut, LayoutError, Segments, contiguous, correspond, flatten, shift, shuffle, take
from ..base.errors import UnsupportedModelError
from .group_layers import LayerVisits
from .layouts import Parts, Scores
from .attention import AttentionVisits
from .tokens import TokenVisits, is_layout_op, layout_segments
from .trace import (_ELEMENTWISE, _ELEMENTWISE_METHOD, _NON_TENSOR_METHOD, _SAME_FN, _SAME_METHOD, FIXED,
                    drop_path_off, is_drop_path, is_split, numel, op_name, tensor_shape)



class _Shuffling:
    """A channel axis viewed as (groups, width/groups), perhaps with those axes swapped: half of a channel shuffle."""

    def __init__(self, segs: Segments, groups: int, swapped: bool = False) -> None:
        self.segs, self.groups, self.swapped = segs, groups, swapped


class GroupTracer(LayerVisits, TokenVisits, AttentionVisits):
    """Walks the fx graph once, giving each tensor the groups of its channel axis (dim 1, or the layouts of
    layouts.py: tokens, heads, scores) and unioning the groups that an operation ties together. A tensor's channels
    are a tuple of `Seg`s (channels.py): one normally, several after a `cat`, interleaved after a channel shuffle,
    repeated after a flatten. A group that reaches the output,
    or meets a tensor it cannot be permuted with, is tied to FIXED and never permuted. When an operation takes part
    of a group (a chunk, a shuffle), the group is cut: `splits` records where each layer's outputs are cut, and
    `resolve` traces again until nothing more needs cutting."""

    def __init__(self, gm: fx.GraphModule, splits: dict[str, set[int]] | None = None) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.parent: dict[str, str] = {FIXED: FIXED}
        self.sizes: dict[str, int] = {}
        self.splits = splits if splits is not None else {}
        self.pieces: dict[str, tuple[str, int]] = {}  # group → (the layer output it is part of, its first unit)
        self.origins: set[str] = set()  # the layer outputs named so far
        self.axes: dict[str, list] = {}
        self.value: dict[fx.Node, Segments | None] = {}
        self.weight_layers: list[fx.Node] = []
        self.ties: list[tuple[str | None, str | None, int, fx.Node]] = []  # (group in, group out, blocks, node)
        self.grouped: dict[str, tuple[int, int]] = {}  # grouped-conv weight → (groups, input channels)
        self.params_of: dict[fx.Node, tuple[str, int]] = {}  # parameters read in forward → (name, ndim)

    def find(self, g: str) -> str:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str, node: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if FIXED not in (ra, rb) and self.sizes[ra] != self.sizes[rb]:
            raise UnsupportedModelError(node.name, op_name(node, self.modules),
                                        "tensors of different widths are combined")
        if rb == FIXED:
            ra, rb = rb, ra
        self.parent[rb] = ra

    @classmethod
    def resolve(cls, gm: fx.GraphModule) -> GroupTracer:
        """Trace, cutting groups where operations need it, until a pass needs no new cut (each adds at least one)."""
        splits: dict[str, set[int]] = {}
        while True:
            tracer = cls(gm, splits)
            try:
                tracer.run()
                return tracer
            except Cut as cut:
                tracer.cut(cut.cuts)

    def cut(self, cuts: list[tuple[str, int]]) -> None:
        """Record the cuts for the next pass: a group is cut with every group it is tied to, unit for unit."""
        for g, k in cuts:
            root = self.find(g)
            tied = [g] if root == FIXED else [p for p in self.pieces if self.find(p) == root]
            for p in tied:
                origin, lo = self.pieces[p]
                self.splits.setdefault(origin, set()).add(lo + k)

    def checked(self, fn, node: fx.Node, *args):
        """A channels.py function, its LayoutError reported as a refusal naming the node (Cut passes through)."""
        try:
            return fn(*args)
        except LayoutError as e:
            raise UnsupportedModelError(node.name, op_name(node, self.modules), str(e)) from None

    def union_segments(self, a: Segments, b: Segments, node: fx.Node) -> None:
        width = max(s.start + (s.units - 1) * s.stride + s.repeat for s in a + b)
        for x, y in self.checked(correspond, node, a, b, width):
            self.union(x, y, node)

    def fix(self, segments: Segments, node: fx.Node) -> None:
        for s in segments:
            self.union(s.group, FIXED, node)

    def new_group(self, name: str, size: int) -> Segments:
        """A layer's output units: one group, or one per piece where earlier passes cut it."""
        origin = name
        while origin in self.parent or origin in self.origins:
            origin += "_"
        self.origins.add(origin)
        bounds = [0, *sorted(k for k in self.splits.get(origin, ()) if 0 < k < size), size]
        pieces = []
        for lo, hi in zip(bounds, bounds[1:]):
            g = origin if len(bounds) == 2 else f"{origin}[{lo}:{hi}]"
            self.parent[g], self.sizes[g], self.pieces[g] = g, hi - lo, (origin, lo)
            pieces.append((g, hi - lo))
        return contiguous(pieces)

    def bind(self, param: str, ndim: int, axis: int, segments: Segments, node: fx.Node) -> None:
        axes = self.axes.setdefault(param, [None] * ndim)
        if axes[axis] is None:
            axes[axis] = segments
        else:
            self.union_segments(axes[axis], segments, node)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.value[node] = self.visit(node)

    def visit(self, node: fx.Node):
        if node.op in ("placeholder", "get_attr"):
            self.follow_param(node)
            return None
        if node.op == "output":
            for n in node.all_input_nodes:
                value = self.value.get(n)
                if isinstance(value, Scores):
                    self.union(value.group, FIXED, node)
                for segs in layout_segments(value) if value is not None else ():
                    self.fix(segs, node)
            return None
        if node.target is getattr:  # x.shape
            return None
        ins = [self.value.get(n) for n in node.all_input_nodes]
        grouped = [v for v in ins if v is not None]
        if any(isinstance(v, (Parts, _Shuffling)) for v in grouped):
            if node.op == "call_method" and node.target in _NON_TENSOR_METHOD:
                return None
            return self.visit_channel_view(node, grouped[0])
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target], ins[0] if ins else None)
        if node.op == "call_method" and node.target in _NON_TENSOR_METHOD:
            return None
        if not grouped:
            self.follow_param(node)
            return None
        src = ins[0] if ins and ins[0] is not None else grouped[0]
        if is_layout_op(node, grouped):
            return self.visit_layout(node, src, grouped)
        method = node.op == "call_method"
        if node.target in _SAME_FN or (method and node.target in _SAME_METHOD):
            return src
        if is_drop_path(node):
            if drop_path_off(node):
                return src
            raise UnsupportedModelError(node.name, op_name(node, self.modules), "stochastic depth in training mode "
                                        "drops whole samples at random: call .eval() first")
        if node.target in _ELEMENTWISE or (method and node.target in _ELEMENTWISE_METHOD):
            return self.visit_elementwise(node)
        if node.target in (torch.cat, torch.concat):
            return self.visit_cat(node)
        if is_split(node):
            return self.visit_split(node, src)
        if node.target in (torch.flatten,) or (method and node.target in ("flatten", "view", "reshape")):
            return self.visit_flatten(node, src)
        if node.target in (torch.mean, torch.sum) or (method and node.target in ("mean", "sum")):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if dims and 1 not in dims and all(d > 1 for d in dims):
                return src
        raise UnsupportedModelError(node.name, op_name(node, self.modules))

    def visit_elementwise(self, node: fx.Node):
        tensors = list(node.all_input_nodes)
        grouped = [self.value[n] for n in tensors if self.value[n] is not None]
        first = grouped[0]
        for v in grouped[1:]:
            self.union_segments(first, v, node)
        for n in tensors:
            if self.value[n] is None:
                shape = tensor_shape(n)
                if shape is None or (len(shape) > 1 and shape[1] != 1 and numel(shape) != 1):
                    self.fix(first, node)
        return first

    def visit_cat(self, node: fx.Node):
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = len(tensor_shape(node) or ())
        if dim % max(ndim, 1) != 1:
            raise UnsupportedModelError(node.name, "cat", f"concatenation along dim {dim}, not channels")
        values = [self.value.get(p) for p in parts]
        if any(v is None for v in values):
            raise UnsupportedModelError(node.name, "cat", "concatenates permuted with un-permuted tensors")
        out, offset = [], 0
        for p, v in zip(parts, values):
            out += shift(v, offset)
            offset += tensor_shape(p)[1]
        return tuple(out)

    def visit_split(self, node: fx.Node, src):
        """chunk/split along channels: each part takes a range of entries (its groups cut where they straddle)."""
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        metas = node.meta.get("tensor_meta")
        ndim = len(tensor_shape(node.args[0]) or ())
        if dim % max(ndim, 1) != 1 or not isinstance(metas, (list, tuple)):
            raise UnsupportedModelError(node.name, op_name(node, self.modules),
                                        f"a split along dim {dim}, not channels")
        parts, lo = [], 0
        for m in metas:
            parts.append(self.checked(take, node, src, lo, lo + m.shape[1]))
            lo += m.shape[1]
        return Parts(parts)

    def visit_channel_view(self, node: fx.Node, src):
        """The parts of a split, and the channel shuffle: view (batch, C, …) → (batch, g, C/g, …), transpose
        dims 1 and 2, view back to (batch, C, …)."""
        method, target = node.op == "call_method", node.target
        if isinstance(src, Parts) and target is operator.getitem:
            return src.parts[node.args[1]]
        if isinstance(src, _Shuffling):
            if target in _SAME_FN or (method and target in _SAME_METHOD):
                return src
            if target is torch.transpose or (method and target == "transpose"):
                ndim = len(tensor_shape(node) or ())
                if sorted(d % ndim for d in node.args[1:3] if isinstance(d, int)) == [1, 2]:
                    return _Shuffling(src.segs, src.groups, not src.swapped)
            if target is torch.flatten or (method and target in ("view", "reshape", "flatten")):
                shape_in, shape_out = tensor_shape(node.args[0]), tensor_shape(node)
                if shape_out == shape_in[:1] + (shape_in[1] * shape_in[2],) + shape_in[3:]:
                    width = shape_out[1]
                    return self.checked(shuffle, node, src.segs, src.groups, width) if src.swapped else src.segs
        raise UnsupportedModelError(node.name, op_name(node, self.modules), "a channel view other than a channel "
                                    "shuffle (view to (batch, groups, C/groups, …), transpose(1, 2), view back)")

    def visit_flatten(self, node: fx.Node, src):
        shape_in, shape_out = tensor_shape(node.args[0]), tensor_shape(node)
        if shape_in is None or shape_out is None:
            raise UnsupportedModelError(node.name, op_name(node, self.modules), "shape unknown")
        if len(shape_out) == 2 and shape_out[0] == shape_in[0] and numel(shape_in[1:]) == shape_out[1]:
            return flatten(src, numel(shape_in[2:]))
        if tuple(shape_out) == tuple(shape_in) or (len(shape_out) >= 3 and shape_out[:2] == shape_in[:2]):
            return src  # the same shape, or spatial axes merged ((batch, C, H, W) → (batch, C, H·W))
        if len(shape_in) >= 2 and shape_out == shape_in[:1] + (shape_out[1], shape_in[1] // shape_out[1]) + \
                shape_in[2:] and shape_in[1] % shape_out[1] == 0:
            return _Shuffling(src, shape_out[1])
        raise UnsupportedModelError(node.name, op_name(node, self.modules), "reshape other than flatten to (batch, -1) "
                                    "or a channel shuffle")
