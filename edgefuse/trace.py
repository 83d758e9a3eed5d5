"""Trace a model with torch.fx and give every tensor the permutation group of its channel axis."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .channels import Cut, LayoutError, Seg, Segments, contiguous, correspond, flatten, shift, shuffle, take
from .errors import EdgefuseError, UnsupportedModelError, first_line

_SAME = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
         nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
         nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_SAME_FN = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu,
            torch.sigmoid, torch.tanh, torch.nn.functional.dropout, torch.nn.functional.max_pool2d,
            torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.relu6,
            torch.nn.functional.hardsigmoid, torch.nn.functional.hardswish, torch.nn.functional.sigmoid,
            torch.nn.functional.leaky_relu, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d}
# Stochastic depth (torchvision.ops.stochastic_depth, which torch.fx keeps as one call): the identity when its
# `training` argument is False, as it is in an eval-mode model. timm's DropPath needs nothing: it traces away.
_DROP_PATH_FN = {"stochastic_depth", "drop_path"}
_SAME_METHOD = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_ELEMENTWISE_METHOD = {"add", "sub", "mul", "div"}
_NON_TENSOR_METHOD = {"size", "dim"}
FIXED = "__fixed__"
_SPLIT_FN = {torch.chunk, torch.split}
_SPLIT_METHOD = {"chunk", "split"}


class _Parts:
    """The value of a chunk/split node: the segments of each part, picked by getitem."""

    def __init__(self, parts: list[Segments]) -> None:
        self.parts = parts


class _Shuffling:
    """A channel axis viewed as (groups, width/groups), perhaps with those axes swapped: half of a channel shuffle."""

    def __init__(self, segs: Segments, groups: int, swapped: bool = False) -> None:
        self.segs, self.groups, self.swapped = segs, groups, swapped


class GroupTracer:
    """Walks the fx graph once, giving each tensor the groups of its channel axis (dim 1) and unioning the groups
    that an operation ties together. A tensor's channels are a tuple of `Seg`s (channels.py): one normally, several
    after a `cat`, interleaved after a channel shuffle, repeated after a flatten. A group that reaches the output,
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
        self.axes: dict[str, list] = {}
        self.value: dict[fx.Node, Segments | None] = {}
        self.weight_layers: list[fx.Node] = []
        self.ties: list[tuple[str | None, str | None, int, fx.Node]] = []  # (group in, group out, blocks, node)
        self.grouped: dict[str, tuple[int, int]] = {}  # grouped-conv weight → (groups, input channels)

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
            raise UnsupportedModelError(node.name, _op(node, self.modules), "tensors of different widths are combined")
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
            raise UnsupportedModelError(node.name, _op(node, self.modules), str(e)) from None

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
        while origin in self.parent or any(o == origin for o, _ in self.pieces.values()):
            origin += "_"
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
            return None
        if node.op == "output":
            for n in node.all_input_nodes:
                if self.value.get(n) is not None:
                    self.fix(self.value[n], node)
            return None
        ins = [self.value.get(n) for n in node.all_input_nodes]
        grouped = [v for v in ins if v is not None]
        if any(isinstance(v, (_Parts, _Shuffling)) for v in grouped):
            if node.op == "call_method" and node.target in _NON_TENSOR_METHOD:
                return None
            return self.visit_channel_view(node, grouped[0])
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target], ins[0] if ins else None)
        if node.op == "call_method" and node.target in _NON_TENSOR_METHOD:
            return None
        if not grouped:
            return None
        src = ins[0] if ins and ins[0] is not None else grouped[0]
        method = node.op == "call_method"
        if node.target in _SAME_FN or (method and node.target in _SAME_METHOD):
            return src
        if is_drop_path(node):
            if drop_path_off(node):
                return src
            raise UnsupportedModelError(node.name, _op(node, self.modules), "stochastic depth in training mode "
                                        "drops whole samples at random: call .eval() first")
        if node.target in _ELEMENTWISE or (method and node.target in _ELEMENTWISE_METHOD):
            return self.visit_elementwise(node)
        if node.target in (torch.cat, torch.concat):
            return self.visit_cat(node)
        if node.target in _SPLIT_FN or (method and node.target in _SPLIT_METHOD):
            return self.visit_split(node, src)
        if node.target in (torch.flatten,) or (method and node.target in ("flatten", "view", "reshape")):
            return self.visit_flatten(node, src)
        if node.target in (torch.mean, torch.sum) or (method and node.target in ("mean", "sum")):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if dims and 1 not in dims and all(d > 1 for d in dims):
                return src
        raise UnsupportedModelError(node.name, _op(node, self.modules))

    def visit_module(self, node: fx.Node, mod: nn.Module, src):
        name = node.target
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == mod.in_channels == mod.out_channels > 1:
            return self.visit_depthwise(node, mod, src)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups != 1:
            return self.visit_grouped(node, mod, src)
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if isinstance(mod, nn.Linear) and src is not None and len(_shape(node.args[0]) or ()) != 2:
                raise UnsupportedModelError(node.name, "Linear", "Linear over a non-2D tensor (tokens, as in "
                                            "attention blocks) is not supported yet")
            w = mod.weight
            if src is not None:
                self.bind(f"{name}.weight", w.ndim, 1, src, node)
            out = self.new_group(name, w.shape[0])
            self.bind(f"{name}.weight", w.ndim, 0, out, node)
            if mod.bias is not None:
                self.bind(f"{name}.bias", 1, 0, out, node)
            self.weight_layers.append(node)
            return out
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            return self.visit_norm(node, mod, src)
        if isinstance(mod, _SAME):
            return src
        if isinstance(mod, nn.Flatten):
            return self.visit_flatten(node, src) if src is not None else None
        if not any(self.value.get(n) for n in node.all_input_nodes):
            return None  # a module on tensors that are never permuted needs nothing
        raise UnsupportedModelError(node.name, type(mod).__name__)

    def visit_depthwise(self, node: fx.Node, mod: nn.Module, src):
        """A depthwise conv maps channel c to channel c: its filters follow the input's permutation."""
        self.weight_layers.append(node)
        if src is None:
            return None
        self.bind(f"{node.target}.weight", mod.weight.ndim, 0, src, node)
        if mod.bias is not None:
            self.bind(f"{node.target}.bias", 1, 0, src, node)
        return src

    def visit_grouped(self, node: fx.Node, mod: nn.Module, src):
        """A grouped conv maps input block j to output block j: its weight is bound as the dense block-diagonal
        matrix it stands for, and its input and output groups are tied into one family of `groups` blocks."""
        name, w = node.target, mod.weight
        if src is not None and (len(src) != 1 or src[0].repeat != 1 or src[0].stride != 1):
            raise UnsupportedModelError(node.name, type(mod).__name__, "grouped convolution over concatenated, "
                                        "shuffled or flattened channels")
        if src is not None:
            self.bind(f"{name}.weight", w.ndim, 1, src, node)
        out = self.new_group(name, w.shape[0])
        self.bind(f"{name}.weight", w.ndim, 0, out, node)
        if mod.bias is not None:
            self.bind(f"{name}.bias", 1, 0, out, node)
        self.grouped[f"{name}.weight"] = (mod.groups, mod.in_channels)
        if len(out) != 1:
            raise UnsupportedModelError(node.name, type(mod).__name__, "grouped convolution whose outputs are split")
        self.ties.append((src[0].group if src is not None else None, out[0].group, mod.groups, node))
        self.weight_layers.append(node)
        return out

    def visit_norm(self, node: fx.Node, mod: nn.Module, src):
        if src is None:
            return None
        if isinstance(mod, nn.LayerNorm) and (len(mod.normalized_shape) != 1 or len(_shape(node.args[0])) != 2):
            raise UnsupportedModelError(node.name, "LayerNorm", "only LayerNorm over 2-D features is supported")
        if any(s.repeat != 1 for s in src):
            raise UnsupportedModelError(node.name, type(mod).__name__, "normalisation after a flatten")
        if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
            if len(src) != 1 or src[0].stride != 1:
                raise UnsupportedModelError(node.name, "GroupNorm", "groups of concatenated or shuffled channels")
            self.ties.append((src[0].group, src[0].group, mod.num_groups, node))  # its blocks move only as wholes
        for p, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is not None and t.ndim == 1:
                self.bind(f"{node.target}.{p}", 1, 0, src, node)
        return src

    def visit_elementwise(self, node: fx.Node):
        tensors = list(node.all_input_nodes)
        grouped = [self.value[n] for n in tensors if self.value[n] is not None]
        first = grouped[0]
        for v in grouped[1:]:
            self.union_segments(first, v, node)
        for n in tensors:
            if self.value[n] is None:
                shape = _shape(n)
                if shape is None or (len(shape) > 1 and shape[1] != 1 and _numel(shape) != 1):
                    self.fix(first, node)
        return first

    def visit_cat(self, node: fx.Node):
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = len(_shape(node) or ())
        if dim % max(ndim, 1) != 1:
            raise UnsupportedModelError(node.name, "cat", f"concatenation along dim {dim}, not channels")
        values = [self.value.get(p) for p in parts]
        if any(v is None for v in values):
            raise UnsupportedModelError(node.name, "cat", "concatenates permuted with un-permuted tensors")
        out, offset = [], 0
        for p, v in zip(parts, values):
            out += shift(v, offset)
            offset += _shape(p)[1]
        return tuple(out)

    def visit_split(self, node: fx.Node, src):
        """chunk/split along channels: each part takes a range of entries (its groups cut where they straddle)."""
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        metas = node.meta.get("tensor_meta")
        ndim = len(_shape(node.args[0]) or ())
        if dim % max(ndim, 1) != 1 or not isinstance(metas, (list, tuple)):
            raise UnsupportedModelError(node.name, _op(node, self.modules), f"a split along dim {dim}, not channels")
        parts, lo = [], 0
        for m in metas:
            parts.append(self.checked(take, node, src, lo, lo + m.shape[1]))
            lo += m.shape[1]
        return _Parts(parts)

    def visit_channel_view(self, node: fx.Node, src):
        """The parts of a split, and the channel shuffle: view (batch, C, …) → (batch, g, C/g, …), transpose
        dims 1 and 2, view back to (batch, C, …)."""
        method, target = node.op == "call_method", node.target
        if isinstance(src, _Parts) and target is operator.getitem:
            return src.parts[node.args[1]]
        if isinstance(src, _Shuffling):
            if target in _SAME_FN or (method and target in _SAME_METHOD):
                return src
            if target is torch.transpose or (method and target == "transpose"):
                ndim = len(_shape(node) or ())
                if sorted(d % ndim for d in node.args[1:3] if isinstance(d, int)) == [1, 2]:
                    return _Shuffling(src.segs, src.groups, not src.swapped)
            if target is torch.flatten or (method and target in ("view", "reshape", "flatten")):
                shape_in, shape_out = _shape(node.args[0]), _shape(node)
                if shape_out == shape_in[:1] + (shape_in[1] * shape_in[2],) + shape_in[3:]:
                    width = shape_out[1]
                    return self.checked(shuffle, node, src.segs, src.groups, width) if src.swapped else src.segs
        raise UnsupportedModelError(node.name, _op(node, self.modules), "a channel view other than a channel "
                                    "shuffle (view to (batch, groups, C/groups, …), transpose(1, 2), view back)")

    def visit_flatten(self, node: fx.Node, src):
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if shape_in is None or shape_out is None:
            raise UnsupportedModelError(node.name, _op(node, self.modules), "shape unknown")
        if len(shape_out) == 2 and shape_out[0] == shape_in[0] and _numel(shape_in[1:]) == shape_out[1]:
            return flatten(src, _numel(shape_in[2:]))
        if tuple(shape_out) == tuple(shape_in):
            return src
        if len(shape_in) >= 2 and shape_out == shape_in[:1] + (shape_out[1], shape_in[1] // shape_out[1]) + \
                shape_in[2:] and shape_in[1] % shape_out[1] == 0:
            return _Shuffling(src, shape_out[1])
        raise UnsupportedModelError(node.name, _op(node, self.modules), "reshape other than flatten to (batch, -1) "
                                    "or a channel shuffle")


def is_drop_path(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _DROP_PATH_FN


def drop_path_off(node: fx.Node) -> bool:
    """Stochastic depth whose `training` argument is False: the identity."""
    return node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True) is False


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _op(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def trace(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """Symbolic trace with shapes attached; models fx cannot trace are refused, naming the reason."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds on data-dependent Python
        raise UnsupportedModelError("<trace>", type(model).__name__, f"torch.fx cannot trace it: {first_line(e)}")
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input)
        except Exception as e:  # torch reports shape errors as RuntimeError and others
            raise EdgefuseError(f"an input of shape {tuple(example_input.shape[1:])} does not fit the model: "
                                f"{first_line(e)}") from None
    return gm
