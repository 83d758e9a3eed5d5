"""N models of one architecture as one network of grouped kernels: an exact rewrite, fewer and larger kernels.

Every hidden tensor carries the N members' channels side by side, model-major: [model 0 | model 1 | ...]. A layer
fed by a tensor all members share (the input, or a fused trunk's output) concatenates the members' output channels;
later convs become grouped convs (groups × N), Linear layers one batched MatMul, BatchNorm and GroupNorm
concatenate their parameters, LayerNorm becomes a GroupNorm of N groups. The mean over members closes the graph; a
final Linear and that mean fold into one Linear. Used for the batched exact ensemble and for a FusedModel's heads.
"""
from __future__ import annotations

import copy
import functools
import operator

import torch
import torch.fx as fx
from torch import nn

from ..base.errors import EdgefuseError, UnsupportedModelError
from ..spec.trace import (_ELEMENTWISE, _ELEMENTWISE_METHOD, _SAME, _SAME_FN, _SAME_METHOD, drop_path_off, is_drop_path,
                          node_groups, trace_members)
from .layers import GroupedLinear, WideLinear, as_param, batched_conv, batched_norm, cat_copy
from ..base.combine import DEFAULT_COMBINE, check_combine, combine_outputs
from .stacked import stack_models
from .views import ChannelViews

_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHOD = {"mean", "sum", "amax", "amin"}


class BatchRewriter(ChannelViews):
    """Walks the members' identical fx graphs once, building the batched graph and its modules."""

    def __init__(self, models: list[nn.Module], combine: str, head_outputs: bool) -> None:
        self.gms = trace_members(models)
        self.n, self.combine, self.head_outputs = len(models), combine, head_outputs
        self.mods = [dict(g.named_modules()) for g in self.gms]
        self.graph, self.env, self.owned = fx.Graph(), {}, {}
        self.batched: set[fx.Node] = set()
        self.shape_of_batched: set[fx.Node] = set()
        self.layout: dict[fx.Node, object] = {}
        self.combined = False
        self.init_views()

    def run(self) -> fx.GraphModule:
        for group in node_groups(self.gms):
            self.env[group[0]] = self.visit(group[0], group)
        gm = fx.GraphModule(self.owned, self.graph)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm.eval()

    def arg(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def is_batched(self, a) -> bool:
        found = []
        fx.node.map_arg(a, lambda n: found.append(self.env[n] in self.batched))
        return any(found)

    def expand(self, new: fx.Node) -> fx.Node:
        """A shared tensor joins batched ones: every member gets its own copy of the channels."""
        if new in self.batched or not isinstance(new, fx.Node):
            return new
        if new.op == "get_attr" and getattr(self.owned.get(new.target), "ndim", 2) < 2:
            return new  # a scalar or a per-column constant broadcasts to every member as it is
        return self.copy_per_member(new)

    def copy_per_member(self, new: fx.Node) -> fx.Node:
        out = self.graph.call_function(torch.cat, ([new] * self.n, 1))
        self.batched.add(out)
        return out

    def emit(self, op: str, target, args, kwargs, batched: bool, layout=None) -> fx.Node:
        """A node of the new graph; a batched one inherits the channel layout of its first batched argument
        (used by neuron-level fusion, where fused and isolated units share the channel axis)."""
        out = self.graph.create_node(op, target, args, kwargs)
        if batched:
            self.batched.add(out)
            if layout is None:
                found: list = []
                fx.node.map_arg((args, kwargs), lambda n: found.append(self.layout.get(n)))
                layout = next((f for f in found if f is not None), None)
            if layout is not None:
                self.layout[out] = layout
        return out

    def visit(self, node: fx.Node, group: tuple[fx.Node, ...]):
        if node.op == "placeholder":
            return self.graph.node_copy(node)
        if node.op == "get_attr":
            return self.visit_attr(node)
        if node.op == "output":
            return self.visit_output(node)
        if node.op == "call_module":
            return self.visit_module(node, [m[node.target] for m in self.mods])
        return self.visit_function(node)

    def visit_attr(self, node: fx.Node) -> fx.Node:
        values = [functools.reduce(getattr, node.target.split("."), g) for g in self.gms]
        if isinstance(values[0], torch.Tensor) and not all(torch.equal(values[0], v) for v in values[1:]):
            raise UnsupportedModelError(node.name, "get_attr", "a tensor used outside a layer differs between "
                                        "the models; it has no batched form yet")
        self.owned[node.target] = copy.deepcopy(values[0])
        return self.graph.get_attr(node.target)

    def visit_output(self, node: fx.Node):
        (out,) = node.args
        if not isinstance(out, fx.Node):
            raise UnsupportedModelError(node.name, "output", "models with several outputs are not batched yet")
        new = self.env[out]
        if new in self.batched and not self.combined:
            members = self.graph.call_method("unflatten", (new, 1, (self.n, -1)))
            new = self.graph.call_function(combine_outputs, (members, 1, self.combine))
            if self.head_outputs:
                new = (new, members)
        return self.graph.output(new)

    def visit_module(self, node: fx.Node, mods: list[nn.Module]):
        first, (src,) = mods[0], node.args[:1] or (None,)
        x = self.env[src] if isinstance(src, fx.Node) else None
        batched = x in self.batched
        name = node.target
        if isinstance(first, nn.Linear):
            if self.folds(node):
                folded = copy.deepcopy(first)
                if batched:
                    folded.in_features *= self.n
                    folded.weight = as_param(cat_copy([m.weight for m in mods], 1) / self.n)
                else:
                    folded.weight = as_param(cat_copy([m.weight.unsqueeze(0) for m in mods]).mean(0))
                if first.bias is not None:
                    folded.bias = as_param(cat_copy([m.bias.unsqueeze(0) for m in mods]).mean(0))
                self.owned[name], self.combined = folded, True
                return self.emit("call_module", name, (x,), {}, batched=False)
            self.owned[name] = GroupedLinear(mods, node.name) if batched else WideLinear(mods, node.name)
        elif isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if not batched and first.groups != 1:
                x, batched = self.expand(x), True
            self.owned[name] = batched_conv(mods, shared_input=not batched)
        elif isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
            x = self.expand(x)
            self.owned[name] = batched_norm(mods, node)
        elif isinstance(first, nn.Flatten):
            if batched and (first.start_dim != 1 or first.end_dim != -1):
                raise UnsupportedModelError(node.name, "Flatten", "only flatten from dim 1 to the end is batched")
            self.owned[name] = copy.deepcopy(first)
            return self.emit("call_module", name, (x,), {}, batched)
        elif isinstance(first, _SAME) or (not batched and not list(first.parameters()) + list(first.buffers())):
            self.owned[name] = copy.deepcopy(first)
            return self.emit("call_module", name, self.arg(node.args), self.arg(node.kwargs), batched)
        else:
            raise UnsupportedModelError(node.name, type(first).__name__, "no batched form for this layer yet")
        return self.emit("call_module", name, (x,), {}, batched=True)

    def folds(self, node: fx.Node) -> bool:
        """A last Linear followed only by the output folds the mean over members into itself (mean of logits)."""
        users = list(node.users)
        return self.combine == "mean" and not self.head_outputs and len(users) == 1 and users[0].op == "output"

    def visit_function(self, node: fx.Node):
        method = node.op == "call_method"
        args, kwargs = self.arg(node.args), self.arg(node.kwargs)
        batched = self.is_batched(node.args) or self.is_batched(node.kwargs)
        target = node.target
        if (method and target in ("size", "dim")) or target is getattr:
            out = self.emit(node.op, target, args, kwargs, batched=False)
            if batched and target != "dim":
                dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")) if method else None
                if dim is None:  # the whole shape: only its batch entry may be read later
                    self.shape_of_batched.add(out)
                elif not (isinstance(dim, int) and (dim == 0 or dim >= 2)):
                    raise UnsupportedModelError(node.name, "size", "reads the channel count of a batched tensor")
            return out
        view = self.visit_view(node, args, kwargs)
        if view is not None:
            return view
        if target is operator.getitem and self.env[node.args[0]] in self.shape_of_batched:
            if not (isinstance(node.args[1], int) and (node.args[1] == 0 or node.args[1] >= 2)):  # batch, spatial
                raise UnsupportedModelError(node.name, "getitem", "reads the channel count of a batched tensor")
            return self.emit(node.op, target, args, kwargs, batched=False)
        if not batched:
            return self.emit(node.op, target, args, kwargs, batched=False)
        if target in _SAME_FN or (method and target in _SAME_METHOD):
            return self.emit(node.op, target, args, kwargs, batched=True)
        if is_drop_path(node) and drop_path_off(node):  # eval-mode stochastic depth: the identity
            return args[0]
        if target in _ELEMENTWISE or (method and target in _ELEMENTWISE_METHOD):
            args = tuple(self.expand(a) if isinstance(a, fx.Node) else a for a in args)
            return self.emit(node.op, target, args, kwargs, batched=True)
        if target in (torch.cat, torch.concat):
            return self.visit_cat(node, args, kwargs)
        if target is torch.flatten or (method and target == "flatten"):
            start = (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
            end = (node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1))
            if start == 1 and end == -1:
                return self.emit(node.op, target, args, kwargs, batched=True)
        if method and target in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
            return self.emit(node.op, target, args, kwargs, batched=True)
        if target in _REDUCE or (method and target in _REDUCE_METHOD):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if dims and all(isinstance(d, int) and d >= 2 for d in dims):
                return self.emit(node.op, target, args, kwargs, batched=True)
        name = getattr(target, "__name__", str(target))
        raise UnsupportedModelError(node.name, name, "no batched form for this operation on hidden channels yet")

    def visit_cat(self, node: fx.Node, args, kwargs) -> fx.Node:
        parts = [self.expand(p) for p in args[0]]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim < 0:
            raise UnsupportedModelError(node.name, "cat", "concatenation along a negative or computed dim")
        if dim != 1:
            return self.emit(node.op, node.target, (parts, dim), {}, batched=True)
        # Channel concatenation: per member, so each member's block stays contiguous.
        split = [self.graph.call_method("unflatten", (p, 1, (self.n, -1))) for p in parts]
        joined = self.graph.call_function(torch.cat, (split, 2))
        return self.emit("call_method", "flatten", (joined, 1, 2), {}, batched=True)


def batch_refusals(models: list[nn.Module]) -> tuple[str | None, str | None]:
    """(why the models have no batched form at all, why they have no grouped-kernel form, which alpha fusion builds
    on (fuse/neuron.py)): each the refusal naming the node, None where they have it. Two members show it; the
    member-axis form is tried only where grouped kernels refuse, and a model with neither is refused as
    `batch_models` refuses it, by its grouped-kernel refusal."""
    try:
        with torch.no_grad():
            BatchRewriter(list(models[:2]), DEFAULT_COMBINE, False).run()
        return None, None
    except UnsupportedModelError as e:
        grouped = str(e)
    try:
        stack_models(models[:2], DEFAULT_COMBINE)
        return None, grouped
    except UnsupportedModelError:
        return grouped, grouped


def batch_models(models: list[nn.Module], combine: str = DEFAULT_COMBINE, head_outputs: bool = False) -> fx.GraphModule:
    """One module computing the `combine` of the N members' outputs with grouped kernels (and, with
    `head_outputs`, every member's output too); where the members have no grouped-kernel form (attention), with a
    leading member axis instead (fuse/stacked.py). It owns copies of every tensor and says which form it is in
    `form`; an operation with neither form raises UnsupportedModelError naming the node."""
    check_combine(combine)
    if len(models) < 1:
        raise EdgefuseError("batching needs at least one model")
    try:
        with torch.no_grad():
            gm = BatchRewriter(list(models), combine, head_outputs).run()
        gm.form = "grouped kernels"
    except UnsupportedModelError as grouped:
        try:
            gm = stack_models(models, combine, head_outputs)
        except UnsupportedModelError:
            raise grouped from None
        gm.form = "member axis"
    return gm
