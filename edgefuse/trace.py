"""Trace a model with torch.fx and give every tensor the permutation group of its channel axis."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

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


Segments = tuple  # of (group, repeat): the channel axis of a tensor, one segment per concatenated part


class GroupTracer:
    """Walks the fx graph once, giving each tensor the groups of its channel axis (dim 1) and unioning the groups
    that an operation ties together. A tensor's channels are a tuple of segments (group, repeat): one segment
    normally, several after a `cat`; `repeat` > 1 after a flatten. A group that reaches the output, or meets a
    tensor it cannot be permuted with, is tied to FIXED and never permuted."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.parent: dict[str, str] = {FIXED: FIXED}
        self.sizes: dict[str, int] = {}
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

    def union_segments(self, a: Segments, b: Segments, node: fx.Node) -> None:
        if len(a) != len(b) or any(x[1] != y[1] for x, y in zip(a, b)):
            raise UnsupportedModelError(node.name, _op(node, self.modules),
                                        "combines tensors whose channels are laid out differently "
                                        "(a concatenation or flatten on one side only)")
        for x, y in zip(a, b):
            self.union(x[0], y[0], node)

    def fix(self, segments: Segments, node: fx.Node) -> None:
        for g, _ in segments:
            self.union(g, FIXED, node)

    def new_group(self, name: str, size: int) -> Segments:
        g = name
        while g in self.parent:
            g += "_"
        self.parent[g], self.sizes[g] = g, size
        return ((g, 1),)

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
        if src is not None and (len(src) != 1 or src[0][1] != 1):
            raise UnsupportedModelError(node.name, type(mod).__name__, "grouped convolution over concatenated or "
                                        "flattened channels")
        if src is not None:
            self.bind(f"{name}.weight", w.ndim, 1, src, node)
        out = self.new_group(name, w.shape[0])
        self.bind(f"{name}.weight", w.ndim, 0, out, node)
        if mod.bias is not None:
            self.bind(f"{name}.bias", 1, 0, out, node)
        self.grouped[f"{name}.weight"] = (mod.groups, mod.in_channels)
        self.ties.append((src[0][0] if src is not None else None, out[0][0], mod.groups, node))
        self.weight_layers.append(node)
        return out

    def visit_norm(self, node: fx.Node, mod: nn.Module, src):
        if src is None:
            return None
        if isinstance(mod, nn.LayerNorm) and (len(mod.normalized_shape) != 1 or len(_shape(node.args[0])) != 2):
            raise UnsupportedModelError(node.name, "LayerNorm", "only LayerNorm over 2-D features is supported")
        if any(r != 1 for _, r in src):
            raise UnsupportedModelError(node.name, type(mod).__name__, "normalisation after a flatten")
        if isinstance(mod, nn.GroupNorm) and mod.num_groups not in (1, mod.num_channels):
            if len(src) != 1:
                raise UnsupportedModelError(node.name, "GroupNorm", "groups of concatenated channels")
            self.ties.append((src[0][0], src[0][0], mod.num_groups, node))  # its blocks move only as wholes
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
        return tuple(seg for v in values for seg in v)

    def visit_flatten(self, node: fx.Node, src):
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if shape_in is None or shape_out is None:
            raise UnsupportedModelError(node.name, _op(node, self.modules), "shape unknown")
        if len(shape_out) == 2 and shape_out[0] == shape_in[0] and _numel(shape_in[1:]) == shape_out[1]:
            spatial = _numel(shape_in[2:])
            return tuple((g, r * spatial) for g, r in src)
        if tuple(shape_out) == tuple(shape_in):
            return src
        raise UnsupportedModelError(node.name, _op(node, self.modules), "reshape other than flatten to (batch, -1)")


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
