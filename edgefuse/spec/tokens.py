"""How transformer operations move permutation groups: channels-last tensors (tokens), the class token and position
embedding (parameters bound to the residual stream's group), the split of a projection into heads, q·kᵀ (q and k
share one permutation), scores·v and scaled_dot_product_attention (the heads of q, k and v move together: a family
of `heads` blocks, as grouped convolutions are), and nn.MultiheadAttention as one layer with its packed in_proj.
Anything whose effect on heads cannot be proved (qk-norm, rotary or relative position terms, grouped-query heads)
is refused by node."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..base.errors import UnsupportedModelError
from .channels import Segments, take
from .layouts import LAYOUTS, Heads, Parts, Scores, Stacked, Tokens, axis_order, swap
from .trace import _ELEMENTWISE, _ELEMENTWISE_METHOD, _SAME_FN, _SAME_METHOD, MATMUL, SDPA, numel, op_name, tensor_shape

_AXES = {"permute", "transpose"}
_SOFTMAX = {torch.softmax, nn.functional.softmax}
_PARAM_VIEWS = {"expand", "repeat", "to", "type_as", "contiguous", "clone"}


def _is(node: fx.Node, functions: set, methods: set) -> bool:
    return node.target in functions or (node.op == "call_method" and node.target in methods)


def channel_axis(value, ndim: int) -> int | None:
    if isinstance(value, tuple):
        return 1
    if isinstance(value, Tokens):
        return value.channel_axis()
    return value.dim_axis if isinstance(value, Heads) else None


def layout_segments(value) -> list[Segments]:
    """Every channel layout a value carries (none for scores)."""
    if isinstance(value, tuple):
        return [value]
    if isinstance(value, (Tokens, Heads)):
        return [value.segs]
    return list(value.parts) if isinstance(value, Stacked) else []


class TokenVisits:
    """Mixed into GroupTracer, which provides union, union_segments, fix, bind, new_group, checked, value, ties."""

    params_of: dict

    def refuse(self, node: fx.Node, why: str):
        raise UnsupportedModelError(node.name, op_name(node, self.modules), why)

    def follow_param(self, node: fx.Node) -> None:
        """A parameter read by get_attr, or expanded/cast (the class token): its last axis can be bound later."""
        if node.op == "get_attr":
            t = getattr(self.gm, "get_parameter" if node.target in dict(self.gm.named_parameters()) else
                        "get_buffer", lambda _: None)(node.target)
            if isinstance(t, torch.Tensor) and t.ndim >= 1:
                self.params_of[node] = (node.target, t.ndim)
        elif node.op == "call_method" and node.target in _PARAM_VIEWS and node.args and \
                node.args[0] in self.params_of:
            self.params_of[node] = self.params_of[node.args[0]]

    def meet_constant(self, n: fx.Node, segs: Segments, node: fx.Node) -> None:
        """A tensor that is never permuted meets channels on its last axis: a broadcast is fine, a parameter (the
        position embedding, the class token) is bound to the channels' groups, anything else fixes them."""
        shape = tensor_shape(n)
        if shape is not None and (numel(shape) == 1 or shape[-1] == 1):
            return
        if n in self.params_of and shape is not None:
            name, ndim = self.params_of[n]
            self.bind(name, ndim, ndim - 1, segs, node)
        else:
            self.fix(segs, node)

    def visit_layout(self, node: fx.Node, src, grouped: list):
        """A function or method with a channels-last, head or score layout among its inputs (or an axis permutation
        of channels-first ones)."""
        if _is(node, set(), _AXES) or node.target is torch.permute or node.target is torch.transpose:
            return self.visit_axes(node, src)
        if node.target in _SAME_FN or _is(node, _SOFTMAX, _SAME_METHOD | {"softmax"}):
            return src
        if node.target in _ELEMENTWISE or _is(node, set(), _ELEMENTWISE_METHOD):
            return self.visit_layout_elementwise(node)
        if node.target in MATMUL or _is(node, set(), {"matmul", "bmm"}):
            return self.visit_matmul(node)
        if node.target is SDPA:
            return self.visit_sdpa(node)
        if node.target in (torch.cat, torch.concat):
            return self.visit_token_cat(node)
        if node.target is operator.getitem:
            return self.visit_token_index(node, src)
        if node.target is torch.unbind or _is(node, set(), {"unbind"}):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if isinstance(src, Stacked) and dim % src.ndim == src.stack_axis:
                return Parts([src.part(k) for k in range(len(src.parts))])
        if node.target is torch.flatten or _is(node, set(), {"view", "reshape", "flatten"}):
            return self.visit_layout_reshape(node, src)
        if node.target in (torch.mean, torch.sum) or _is(node, set(), {"mean", "sum"}):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            if isinstance(src, Tokens) and dims and all(d % src.ndim != src.ndim - 1 for d in dims):
                ndim = len(tensor_shape(node) or ())
                return Tokens(src.segs, ndim) if ndim >= 3 else src.segs
        self.refuse(node, "an operation on tokens or attention heads whose effect on channels is not known")

    def visit_axes(self, node: fx.Node, src):
        ndim = len(tensor_shape(node.args[0]) or ())
        if node.target in ("transpose", torch.transpose):
            order = swap(ndim, *node.args[1:3])
        else:
            dims = node.args[1:] if node.op == "call_method" else node.args[1]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            order = axis_order(ndim, tuple(dims))
        if order is None:
            self.refuse(node, "an axis permutation that is not known")
        if isinstance(src, (tuple, Tokens)):
            new = order.index(channel_axis(src, ndim))
            segs = src if isinstance(src, tuple) else src.segs
            if new == ndim - 1 and ndim >= 3:
                return Tokens(segs, ndim)
            if new == 1:
                return segs
            self.refuse(node, "moves channels to an axis other than 1 or the last")
        return src.moved(order)

    def visit_layout_elementwise(self, node: fx.Node):
        tensors = list(node.all_input_nodes)
        grouped = [self.value[n] for n in tensors if self.value.get(n) is not None]
        first = grouped[0]
        for v in grouped[1:]:
            if type(v) is not type(first):
                self.refuse(node, "combines tensors whose channels are laid out differently")
            if isinstance(v, Scores):
                self.refuse(node, "adds two sets of attention scores")
            if isinstance(v, Heads) and (v.head_axis, v.dim_axis) != (first.head_axis, first.dim_axis):
                self.refuse(node, "combines heads laid out on different axes")
            for a, b in zip(layout_segments(first), layout_segments(v)):
                self.union_segments(a, b, node)
        for n in tensors:
            if self.value.get(n) is not None:
                continue
            if isinstance(first, Tokens):
                self.meet_constant(n, first.segs, node)
                continue
            shape = tensor_shape(n)
            if shape is None or numel(shape) != 1 and not (isinstance(first, Scores) and first.head_axis is not None
                                                           and shape[first.head_axis - first.ndim] == 1):
                self.refuse(node, "a term over heads or head channels (rotary or relative position embeddings?) "
                            "that no permutation can follow")
        return first

    def visit_matmul(self, node: fx.Node):
        a, b = (self.value.get(n) for n in node.args[:2])
        ndim = len(tensor_shape(node) or ())
        if a is None or b is None:
            self.refuse(node, "a product of channels with a tensor that is not permuted")
        if channel_axis(a, ndim) == ndim - 1 and channel_axis(b, ndim) == ndim - 2:  # q · kᵀ
            if isinstance(a, Heads) != isinstance(b, Heads):
                self.refuse(node, "a product of heads with channels that are not split into heads")
            sa, sb = layout_segments(a)[0], layout_segments(b)[0]
            self.union_segments(sa, sb, node)
            if not isinstance(a, Heads):
                return Scores(sa[0].group, 1, None, ndim)
            if (a.heads, a.head_axis) != (b.heads, b.head_axis):
                self.refuse(node, "q and k with different heads (grouped-query attention?)")
            return Scores(sa[0].group, a.heads, a.head_axis, ndim)
        if isinstance(a, Scores) and channel_axis(b, ndim) == ndim - 1:  # scores · v
            return self.scores_times(node, a, b)
        self.refuse(node, "a product of tensors that is not attention's q·kᵀ or scores·v")

    def scores_times(self, node: fx.Node, scores: Scores, v):
        if isinstance(v, Heads):
            if (v.heads, v.head_axis) != (scores.heads, scores.head_axis):
                self.refuse(node, "values with other heads than the scores (grouped-query attention?)")
            self.ties.append((scores.group, v.segs[0].group, v.heads, node))
        elif scores.heads != 1:
            self.refuse(node, "multi-head scores times values that are not split into heads")
        return v

    def visit_sdpa(self, node: fx.Node):
        q, k, v = (self.value.get(n) for n in node.args[:3])
        ndim = len(tensor_shape(node) or ())
        if any(x is None or channel_axis(x, ndim) != ndim - 1 for x in (q, k, v)):
            self.refuse(node, "attention over tensors whose channels are not on the last axis")
        if any(self.value.get(n) is not None for n in node.all_input_nodes if n not in node.args[:3]):
            self.refuse(node, "an attention mask that carries channels")
        self.union_segments(layout_segments(q)[0], layout_segments(k)[0], node)
        if isinstance(q, Heads) != isinstance(k, Heads) or (isinstance(q, Heads) and
                                                           (q.heads, q.head_axis) != (k.heads, k.head_axis)):
            self.refuse(node, "q and k with different heads (grouped-query attention?)")
        heads, axis = (q.heads, q.head_axis) if isinstance(q, Heads) else (1, None)
        return self.scores_times(node, Scores(layout_segments(q)[0][0].group, heads, axis, ndim), v)

    def visit_token_cat(self, node: fx.Node):
        """Concatenation along tokens (the class token before the patches): every part shares the channels."""
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = len(tensor_shape(node) or ())
        grouped = [self.value.get(p) for p in parts if self.value.get(p) is not None]
        if not all(isinstance(v, Tokens) for v in grouped) or dim % ndim == ndim - 1:
            self.refuse(node, "a concatenation of tokens other than along the token axis")
        first = grouped[0]
        for v in grouped[1:]:
            self.union_segments(first.segs, v.segs, node)
        for p in parts:
            if self.value.get(p) is None:
                self.meet_constant(p, first.segs, node)
        return Tokens(first.segs, ndim)

    def visit_token_index(self, node: fx.Node, src):
        """x[:, 0] (the class token), x[:, 1:]: indexing that leaves the channel axis whole."""
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if isinstance(src, Stacked) and len(index) == 1 and isinstance(index[0], int) and src.stack_axis == 0:
            return src.part(index[0])
        plain = all(isinstance(i, (int, slice)) for i in index)
        if isinstance(src, Tokens) and plain and len(index) < src.ndim:
            ndim = len(tensor_shape(node) or ())
            if ndim >= 3:
                return Tokens(src.segs, ndim)
            if ndim == 2:
                return src.segs
        self.refuse(node, "indexing that takes part of the channels or heads")

    def single(self, segs: Segments, node: fx.Node) -> Segments:
        if len(segs) != 1 or segs[0].repeat != 1 or segs[0].stride != 1:
            self.refuse(node, "heads over concatenated or shuffled channels")
        return segs

    def visit_layout_reshape(self, node: fx.Node, src):
        shape_in, shape_out = tensor_shape(node.args[0]), tensor_shape(node)
        if shape_in is None or shape_out is None:
            self.refuse(node, "shape unknown")
        nd = len(shape_out)
        if isinstance(src, Tokens):
            width = shape_in[-1]
            if shape_out[:-2] == shape_in[:-1] and shape_out[-2] * shape_out[-1] == width:
                return Heads(self.single(src.segs, node), shape_out[-2], nd - 2, nd - 1, nd)
            if shape_out[-1] == width:
                return Tokens(src.segs, nd) if nd >= 3 else src.segs
            if shape_out[:-3] == shape_in[:-1] and numel(shape_out[-3:]) == width:
                k = shape_out[-3]
                parts = tuple(self.single(self.checked(take, node, src.segs, i * width // k, (i + 1) * width // k),
                                          node) for i in range(k))
                return Stacked(parts, shape_out[-2], nd - 3, nd - 2, nd - 1, nd)
        if isinstance(src, Heads) and src.dim_axis == src.head_axis + 1 == src.ndim - 1 and \
                shape_out == shape_in[:-2] + (shape_in[-2] * shape_in[-1],):
            return Tokens(src.segs, nd) if nd >= 3 else src.segs
        self.refuse(node, "a reshape of tokens or heads other than into heads and back")


def is_layout_op(node: fx.Node, grouped: list) -> bool:
    """Whether the token visits take this node: a layout among its inputs, or an axis permutation."""
    return any(isinstance(v, LAYOUTS) for v in grouped) or _is(node, {torch.permute, torch.transpose}, _AXES)
