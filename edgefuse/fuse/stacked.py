"""N members of one architecture as one graph with a leading member axis: every hidden tensor is (N, …) — the
members' tensors stacked — and every operation runs once for all of them. The batched form of networks whose
channels do not stay on axis 1 (transformers: tokens, heads, attention), where the grouped-kernel rewrite
(batched.py) has none: a Linear is one batched MatMul over (N, in, out), a LayerNorm normalises and then scales by
(N, …, C), attention sees the member axis as one more batch axis, and every `dim` argument moves one axis right
(negative ones name the same axis already). Tensors all members share (the input, a fused trunk's output) stay
unstacked until a layer with per-member weights reads them; broadcasting does the rest."""
from __future__ import annotations

import copy
import functools
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from ..base.combine import combine_outputs
from ..base.errors import UnsupportedModelError
from ..spec.trace import (_ELEMENTWISE, _ELEMENTWISE_METHOD, _SAME, _SAME_FN, _SAME_METHOD, MATMUL, POOLS, SDPA,
                          drop_path_off, is_drop_path, node_groups, trace_members)
from .layers import as_param, batched_conv, batched_norm
from .stacked_layers import (ChannelMajor, PerSample, StackedAttention, StackedLayerNorm, StackedLinear, align_param,
                             attention, expand_members, per_sample)

_POOL_FN = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}
_DIM_ARG = {  # operation → positions of its dim arguments (after the tensor), for functions and methods alike
    "softmax": (1,), "log_softmax": (1,), "mean": (1,), "sum": (1,), "amax": (1,), "amin": (1,),
    "transpose": (1, 2), "flatten": (1, 2), "unbind": (1,), "chunk": (2,), "split": (2,), "unflatten": (1,),
    "size": (1,), "unsqueeze": (1,), "squeeze": (1,)}


def _shift(d):
    """A dim of one member's tensor on the stacked one: non-negative dims move right past the member axis."""
    if isinstance(d, (tuple, list)):
        return type(d)(_shift(x) for x in d)
    return d + 1 if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else d


class StackRewriter:
    """Walks the members' identical fx graphs once, building the stacked graph and its modules."""

    def __init__(self, models: list[nn.Module], combine: str, head_outputs: bool) -> None:
        self.gms = trace_members(models)
        self.n, self.combine, self.head_outputs = len(models), combine, head_outputs
        self.mods = [dict(g.named_modules()) for g in self.gms]
        self.graph, self.env, self.owned = fx.Graph(), {}, nn.Module()
        self.stacked: set[fx.Node] = set()
        self.shapes: dict[fx.Node, fx.Node] = {}  # the shape of a stacked tensor → that tensor
        self.tuples: set[fx.Node] = set()  # nodes that return several stacked tensors
        self.params: set[fx.Node] = set()  # members' own parameters read in forward, stacked: (N, *shape)

    def run(self) -> fx.GraphModule:
        for group in node_groups(self.gms):
            self.env[group[0]] = self.visit(group[0])
        gm = fx.GraphModule(self.owned, self.graph)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm.eval()

    def emit(self, op: str, target, args, kwargs, stacked: bool) -> fx.Node:
        out = self.graph.create_node(op, target, args, kwargs)
        if stacked:
            self.stacked.add(out)
        return out

    def is_stacked(self, a) -> bool:
        found: list = []
        fx.node.map_arg(a, lambda n: found.append(self.env[n] in self.stacked))
        return any(found)

    def own(self, name: str, module: nn.Module) -> str:
        key = name.replace(".", "_")
        self.owned.add_module(key, module)
        return key

    def spread(self, x):
        """An unstacked tensor as every member's copy of it: (N, …)."""
        if not isinstance(x, fx.Node) or x in self.stacked:
            return x
        return self.emit("call_function", expand_members, (x, self.n), {}, True)

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.graph.node_copy(node)
        if node.op == "get_attr":
            values = [functools.reduce(getattr, node.target.split("."), g) for g in self.gms]
            same = not isinstance(values[0], torch.Tensor) or all(torch.equal(values[0], v) for v in values[1:])
            value = copy.deepcopy(values[0]) if same else torch.stack([v.detach() for v in values])
            key = node.target.replace(".", "_")
            if isinstance(values[0], nn.Parameter):  # trainable still: a stacked fused model may be distilled
                self.owned.register_parameter(key, as_param(value.detach().clone()))
            elif isinstance(value, torch.Tensor):
                self.owned.register_buffer(key, value)
            else:
                setattr(self.owned, key, value)
            out = self.emit("get_attr", key, (), {}, not same)
            if not same:
                self.params.add(out)
            return out
        if node.op == "output":
            return self.visit_output(node)
        if node.op == "call_module":
            return self.visit_module(node, [m[node.target] for m in self.mods])
        return self.visit_function(node)

    def visit_output(self, node: fx.Node):
        (out,) = node.args
        if not isinstance(out, fx.Node):
            raise UnsupportedModelError(node.name, "output", "models with several outputs are not stacked yet")
        new = self.env[out]
        if new in self.stacked:
            members = new
            new = self.graph.call_function(combine_outputs, (members, 0, self.combine))
            if self.head_outputs:
                new = (new, self.graph.call_method("transpose", (members, 0, 1)))
        return self.graph.output(new)

    def visit_module(self, node: fx.Node, mods: list[nn.Module]):
        first, src = mods[0], node.args[0] if node.args else None
        x = self.env[src] if isinstance(src, fx.Node) else None
        stacked = x in self.stacked
        if isinstance(first, nn.Linear):
            module = StackedLinear(mods, stacked)
        elif isinstance(first, nn.MultiheadAttention):
            inputs = [*node.args[:3], *(node.kwargs.get(k) for k in ("query", "key", "value"))]
            if len({a for a in inputs if isinstance(a, fx.Node)}) != 1 or any(
                    v is not None and k not in ("need_weights", "average_attn_weights") for k, v in
                    node.kwargs.items() if k not in ("query", "key", "value")):
                raise UnsupportedModelError(node.name, "MultiheadAttention", "only self-attention without masks is "
                                            "stacked")
            out = self.emit("call_module", self.own(node.target, StackedAttention(mods, stacked, node.name)), (x,), {},
                            True)
            self.tuples.add(out)
            return out
        elif isinstance(first, nn.LayerNorm):
            module = StackedLayerNorm(mods, stacked, node.name)
        elif isinstance(first, (nn.Conv1d, nn.Conv2d)):
            module = ChannelMajor(batched_conv(mods, shared_input=not stacked), self.n, stacked)
        elif isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not stacked:
                x, stacked = self.spread(x), True
            module = ChannelMajor(batched_norm(mods, node), self.n, True)
        elif isinstance(first, _SAME) or not list(first.parameters()) + list(first.buffers()):
            if isinstance(first, nn.Flatten) and stacked:
                module = nn.Flatten(_shift(first.start_dim), _shift(first.end_dim))
            elif isinstance(first, POOLS) and stacked:
                module = PerSample(copy.deepcopy(first), self.n)
            else:
                module = copy.deepcopy(first)
            return self.emit("call_module", self.own(node.target, module), fx.node.map_arg(
                node.args, lambda n: self.env[n]), fx.node.map_arg(node.kwargs, lambda n: self.env[n]), stacked)
        else:
            raise UnsupportedModelError(node.name, type(first).__name__, "no stacked form for this layer yet")
        return self.emit("call_module", self.own(node.target, module), (x,), {}, True)

    def visit_function(self, node: fx.Node):
        method, target = node.op == "call_method", node.target
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        x = args[0] if args and isinstance(args[0], fx.Node) else None
        if target is operator.getitem and x in self.shapes and isinstance(args[1], int):
            # size(i), not shape[i]: the TorchScript exporter keeps it dynamic (a batch size read from a shape
            # entry of a tensor after movedim became a constant)
            return self.emit("call_method", "size", (self.shapes[x], _shift(args[1])), {}, False)
        if not self.is_stacked((node.args, node.kwargs)):
            return self.emit(node.op, target, args, kwargs, False)
        name = target if method else getattr(target, "__name__", "")
        if target is getattr and args[1] == "shape" or (method and target == "size" and len(args) == 1):
            out = self.emit(node.op, target, args, kwargs, False)
            self.shapes[out] = x
            return out
        if method and target == "dim":
            return self.graph.call_function(operator.sub, (self.emit(node.op, target, args, kwargs, False), 1))
        if is_drop_path(node) and drop_path_off(node):
            return args[0]
        if target in _POOL_FN:
            return self.emit(node.op, per_sample, (target, x, self.n, *args[1:]), kwargs, True)
        if target in MATMUL or (method and target == "matmul"):
            if any(a in self.params for a in args[:2]):
                raise UnsupportedModelError(node.name, name or "matmul", "a product with a parameter (not a Linear) "
                                            "has no stacked form yet")
            return self.emit(node.op, target, args, kwargs, True)
        if target in _ELEMENTWISE or (method and target in _ELEMENTWISE_METHOD):
            other = next((a for a in args if isinstance(a, fx.Node) and a in self.stacked and a not in self.params),
                         None)
            if other is not None:  # a parameter (N, *shape) lined up with the tensor's axes (a layer scale (N, C))
                args = tuple(self.emit("call_function", align_param, (a, other), {}, True) if a in self.params else a
                             for a in args)
            return self.emit(node.op, target, args, kwargs, True)
        if target in _SAME_FN or (method and target in _SAME_METHOD):
            return self.emit(node.op, target, args, kwargs, True)
        if target is SDPA:  # exporters take 4-D attention only: members and samples as one batch axis
            q, k, v = (self.spread(a) for a in args[:3])
            return self.emit(node.op, attention, (q, k, v, self.n, *args[3:]), kwargs, True)
        if target is operator.getitem:
            if x in self.tuples:  # one part of an unbind, chunk, split or attention's (output, weights)
                return self.emit(node.op, target, args, kwargs, True)
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return self.emit(node.op, target, (x, (slice(None), *index)), kwargs, True)
        if target in (torch.cat, torch.concat):
            parts = [self.spread(p) for p in args[0]]
            return self.emit(node.op, target, (parts, _shift(args[1] if len(args) > 1 else kwargs.get("dim", 0))),
                             {}, True)
        if name in ("view", "reshape", "permute"):
            sizes = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            sizes = (0, *_shift(sizes)) if name == "permute" else (self.n, *sizes)
            return self.emit(node.op, target, (x, *sizes) if method else (x, sizes), {}, True)
        if name == "expand" and method:
            return self.emit(node.op, target, (x, -1, *args[1:]), {}, True)
        if name in _DIM_ARG:
            args = tuple(_shift(a) if i in _DIM_ARG[name] else a for i, a in enumerate(args))
            kwargs = {k: _shift(v) if k in ("dim", "start_dim", "end_dim", "dim0", "dim1") else v
                      for k, v in kwargs.items()}
            if name in ("mean", "sum", "amax", "amin") and len(args) < 2 and "dim" not in kwargs:
                raise UnsupportedModelError(node.name, name, "a reduction over every axis mixes the members")
            out = self.emit(node.op, target, args, kwargs, name != "size")
            if name in ("unbind", "chunk", "split"):
                self.tuples.add(out)
            return out
        raise UnsupportedModelError(node.name, name or str(target), "no stacked form for this operation yet")


def stack_models(models: list[nn.Module], combine: str, head_outputs: bool = False) -> fx.GraphModule:
    """One module computing the `combine` of the N members' outputs with a leading member axis (and, with
    `head_outputs`, every member's output too); an operation without a stacked form raises UnsupportedModelError."""
    with torch.no_grad():
        return StackRewriter(list(models), combine, head_outputs).run()
