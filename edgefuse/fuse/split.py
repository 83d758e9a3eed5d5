"""Depth split: the aligned models averaged up to a cut point (the trunk), each model's own layers after it (heads)."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..base.errors import EdgefuseError
from ..spec.permspec import PermSpec
from .model import FusedModel
from ..base.combine import DEFAULT_COMBINE


def average_state(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Mean of floating tensors; integer buffers (BN's batch counters) come from the first model."""
    states = [m.state_dict() for m in models]
    return {k: (sum(s[k] for s in states) / len(states)) if v.is_floating_point() else v.clone()
            for k, v in states[0].items()}


def split_graph(gm: fx.GraphModule, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Two GraphModules: nodes up to `cut` returning its value, and the rest taking that value as input."""
    nodes = list(gm.graph.nodes)
    names = [n.name for n in nodes]
    if cut not in names:
        raise EdgefuseError(f"cut point '{cut}' is not a node of this model")
    at = names.index(cut)
    pre, env = fx.Graph(), {}
    for n in nodes[:at + 1]:
        env[n] = pre.node_copy(n, lambda a: env[a])
    pre.output(env[nodes[at]])
    post, env2 = fx.Graph(), {nodes[at]: None}
    env2[nodes[at]] = post.placeholder("h")

    def arg(a: fx.Node) -> fx.Node:
        if a not in env2:
            if a.op != "get_attr":
                raise EdgefuseError(f"'{cut}' is not a valid cut: '{a.name}' is also needed after it")
            env2[a] = post.node_copy(a, lambda b: env2[b])
        return env2[a]

    for n in nodes[at + 1:]:
        env2[n] = post.node_copy(n, arg)
    pre_gm, post_gm = fx.GraphModule(gm, pre), fx.GraphModule(gm, post)
    for g in (pre_gm, post_gm):
        g.graph.eliminate_dead_code()
        g.recompile()
    return pre_gm, post_gm


def fuse_depth(models: list[nn.Module], spec: PermSpec, depth: int, combine: str = DEFAULT_COMBINE) -> FusedModel:
    """depth 0 is the ensemble; depth k shares the first k weight layers; depth len(cut_points) leaves only the
    N final layers as heads, whose mean of logits equals one averaged final layer: the full merge."""
    cuts = spec.cut_points
    if not 0 <= depth <= len(cuts):
        raise EdgefuseError(f"depth must be between 0 and {len(cuts)} for this model, got {depth}")
    if depth == 0:
        return FusedModel(nn.Identity(), [copy.deepcopy(m) for m in models], combine).eval()
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state(models))
    trunk, _ = split_graph(fx.symbolic_trace(merged), cuts[depth - 1])
    heads = [split_graph(fx.symbolic_trace(copy.deepcopy(m)), cuts[depth - 1])[1] for m in models]
    return FusedModel(trunk, heads, combine).eval()
