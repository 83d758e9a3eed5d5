"""Channel views in a partially fused (α) network. An α tensor's channels are laid out [fused | model 1's isolated |
… | model N's isolated], and its Layout says which member channel each stands for (`fused`, `isolated`: member
channel positions, in α order). A channel cat or chunk gathers the α channels of the member channels it keeps (one
index_select); a channel shuffle only renames member channels, so it runs nothing at all."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..base.errors import UnsupportedModelError
from ..spec.trace import is_split
from .select import Layout
from .views import ARITHMETIC


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


class AlphaViews:
    """Mixed into AlphaRewriter ahead of BatchRewriter: its cat and channel views replace the per-member ones."""

    def init_alpha_views(self) -> None:
        self.shuffles: dict[fx.Node, tuple[int, bool]] = {}  # original view nodes of a shuffle: (groups, swapped)
        self.parts: dict[fx.Node, tuple[fx.Node, Layout, list[tuple[int, int]]]] = {}  # original chunk nodes

    def _select(self, x: fx.Node, index: torch.Tensor, layout: Layout) -> fx.Node:
        name = f"alpha_index_{len(self.owned)}"
        self.owned[name] = index
        return self.emit("call_function", torch.index_select, (x, 1, self.graph.get_attr(name)), {}, batched=True,
                         layout=layout)

    def visit_cat(self, node: fx.Node, args, kwargs) -> fx.Node:
        parts = list(args[0])
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        layouts = [self.layout.get(p) for p in parts]
        if dim != 1 or any(lay is None for lay in layouts):
            raise UnsupportedModelError(node.name, "cat", "neuron-level fusion concatenates only partially fused "
                                        "tensors, along channels")
        fused, isolated, pick_fused, pick_own = [], [], [], [[] for _ in range(self.n)]
        member_at = alpha_at = 0
        for lay in layouts:
            nf, ni = len(lay.fused), len(lay.isolated)
            fused.append(lay.fused + member_at)
            isolated.append(lay.isolated + member_at)
            pick_fused.append(alpha_at + torch.arange(nf))
            for m in range(self.n):
                pick_own[m].append(alpha_at + nf + m * ni + torch.arange(ni))
            member_at, alpha_at = member_at + nf + ni, alpha_at + nf + self.n * ni
        joined = self.graph.call_function(torch.cat, (parts, 1))
        index = torch.cat(pick_fused + [torch.cat(p) for p in pick_own])
        return self._select(joined, index, Layout(node.name, torch.cat(fused), torch.cat(isolated)))

    def visit_view(self, node: fx.Node, args: tuple, kwargs: dict) -> fx.Node | None:
        method, target = node.op == "call_method", node.target
        x, old = (args[0], node.args[0]) if args and isinstance(args[0], fx.Node) else (None, None)
        if target is operator.getitem and x in self.shape_of_batched and node.args[1] == 1:
            out = self.emit(node.op, target, args, kwargs, batched=False)  # read by a shuffle's view, then unused
            self.member_count.add(out)
            return out
        if target in ARITHMETIC and self._uses((args, kwargs), self.member_count):
            out = self.emit(node.op, target, args, kwargs, batched=False)
            self.member_count.add(out)
            return out
        lay = self.layout.get(x)
        if old in self.shuffles:
            return self._shuffle_step(node, x, lay)
        if lay is not None and method and target in ("view", "reshape") and len(args) >= 4 and \
                isinstance(args[2], int) and args[3] in self.member_count:
            self.shuffles[node] = (args[2], False)  # view (batch, groups, C/groups, …): nothing to run yet
            return x
        if lay is not None and is_split(node):
            if kwargs.get("dim", args[2] if len(args) > 2 else 0) != 1:
                raise UnsupportedModelError(node.name, _op(node), "a split of fused channels along another dim")
            width = len(lay.fused) + len(lay.isolated)
            pieces = getattr(torch.arange(width), "chunk" if "chunk" in _op(node) else "split")(args[1])
            self.parts[node] = (x, lay, [(int(p[0]), int(p[-1]) + 1) for p in pieces])
            return x
        if target is operator.getitem and old in self.parts:
            src, lay, bounds = self.parts[old]
            lo, hi = bounds[args[1]]
            keep_f, keep_i = (lay.fused >= lo) & (lay.fused < hi), (lay.isolated >= lo) & (lay.isolated < hi)
            nf, ni = len(lay.fused), len(lay.isolated)
            own = torch.nonzero(keep_i).reshape(-1)
            index = torch.cat([torch.nonzero(keep_f).reshape(-1)] + [nf + m * ni + own for m in range(self.n)])
            return self._select(src, index, Layout(node.name, lay.fused[keep_f] - lo, lay.isolated[keep_i] - lo))
        if self._uses((args, kwargs), self.member_count):
            raise UnsupportedModelError(node.name, _op(node), "uses the channel count of a partially fused tensor "
                                        "other than in a channel shuffle")
        return None

    def _shuffle_step(self, node: fx.Node, x: fx.Node, lay: Layout) -> fx.Node:
        """transpose(1, 2) and contiguous carry the pending shuffle on; the view back renames the member channels."""
        method, target = node.op == "call_method", node.target
        groups, swapped = self.shuffles[node.args[0]]
        if (target is torch.transpose or (method and target == "transpose")) and sorted(node.args[1:3]) == [1, 2]:
            self.shuffles[node] = (groups, not swapped)
            return x
        if method and target == "contiguous":
            self.shuffles[node] = (groups, swapped)
            return x
        if method and target in ("view", "reshape") and len(node.args) >= 3 and node.args[2] == -1:
            if not swapped:
                return x
            m = (len(lay.fused) + len(lay.isolated)) // groups
            moved = Layout(node.name, (lay.fused % m) * groups + lay.fused // m,
                           (lay.isolated % m) * groups + lay.isolated // m)
            return self.emit("call_method", "contiguous", (x,), {}, batched=True, layout=moved)
        raise UnsupportedModelError(node.name, _op(node), "a view of fused channels other than a channel shuffle")
