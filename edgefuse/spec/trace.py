"""Trace a model with torch.fx (shapes attached), and the tables of operations that keep or combine channels."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..base.errors import EdgefuseError, UnsupportedModelError, first_line

POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveMaxPool2d)  # per sample and per channel: across members, they see one batch axis
_SAME = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Hardswish,
         nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, *POOLS)
MATMUL = {torch.matmul, operator.matmul, torch.bmm}
SDPA = torch.nn.functional.scaled_dot_product_attention
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

def is_split(node: fx.Node) -> bool:
    """A chunk or split (function or method): one tensor into several parts."""
    return node.target in (torch.chunk, torch.split) or (node.op == "call_method" and node.target in ("chunk", "split"))


def is_drop_path(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _DROP_PATH_FN


def drop_path_off(node: fx.Node) -> bool:
    """Stochastic depth whose `training` argument is False: the identity."""
    return node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True) is False


def tensor_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def op_name(node: fx.Node, modules: dict) -> str:
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


def trace_members(models: list[nn.Module]) -> list[fx.GraphModule]:
    """Every member traced (a GraphModule as it is), for the rewrites that walk N graphs node by node."""
    try:
        return [m if isinstance(m, fx.GraphModule) else fx.symbolic_trace(m) for m in models]
    except Exception as e:  # fx raises many kinds on data-dependent Python
        raise UnsupportedModelError("<trace>", type(models[0]).__name__,
                                    f"torch.fx cannot trace it: {first_line(e)}") from None


def node_groups(gms: list[fx.GraphModule]):
    """The members' nodes in step, one tuple per node; members that differ in structure are an error."""
    nodes = [list(g.graph.nodes) for g in gms]
    if len({len(ns) for ns in nodes}) != 1:
        raise EdgefuseError("the models differ in structure: their traced graphs have different lengths")
    for group in zip(*nodes):
        if any(nd.op != group[0].op or nd.target != group[0].target for nd in group):
            raise EdgefuseError(f"the models differ in structure at node '{group[0].name}'")
        yield group
