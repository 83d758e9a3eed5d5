"""Neuron-level partial fusion (the paper's α): per permutation group, a fraction α of the aligned units stays
isolated (one copy per model; `select.py` says which), the rest is averaged into fused units.

A hidden tensor's channels are laid out [fused | model 1's isolated | … | model N's isolated]. A fused unit reads
every input (its weights are the mean of the models' weights on fused inputs and 1/N of each model's weights on that
model's isolated inputs); an isolated unit of model m reads the fused inputs and model m's isolated inputs only.
Only those blocks are computed — a dense layer for the fused units, a dense layer from the fused inputs and a
grouped (block-diagonal) layer from the isolated inputs for the isolated units — so α=1 costs exactly the ensemble's
MACs, α=0 exactly one model's, and cost falls monotonically in between. A layer's width is n_f + N·n_i with
n_i = floor(α·n + 0.5) and n_f = n − n_i, i.e. n·(1 + (N−1)·α) rounded to whole units.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

from ..base.errors import UnsupportedModelError
from ..spec.permspec import PermSpec, expand
from .batched import BatchRewriter
from .layers import GroupedLinear, cat_copy, as_param
from .alpha_views import AlphaViews
from .select import DEFAULT_SELECT, Layout, choose_layouts, tensor_layout
from ..base.combine import DEFAULT_COMBINE


class MixedLayer(nn.Module):
    """One Linear/Conv of a partially fused net, computing only its non-zero blocks (see the module docstring).
    `split` is the number of fused input features; None when the input is shared by every model."""

    def __init__(self, fused: nn.Module | None, from_fused: nn.Module | None, from_isolated: nn.Module | None,
                 split: int | None) -> None:
        super().__init__()
        self.fused, self.from_fused, self.from_isolated, self.split = fused, from_fused, from_isolated, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.fused(x)] if self.fused is not None else []
        if self.split is None:
            if self.from_fused is not None:
                parts.append(self.from_fused(x))
        elif self.from_fused is not None or self.from_isolated is not None:
            iso = self.from_fused(x[:, :self.split]) if self.from_fused is not None else None
            if self.from_isolated is not None:
                own = self.from_isolated(x[:, self.split:])
                iso = own if iso is None else iso + own
            parts.append(iso)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _like(first: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> nn.Module:
    """A Linear/Conv with the hyper-parameters of `first` and the given weights (groups > 1: block-diagonal)."""
    if isinstance(first, nn.Linear) and groups > 1:
        out, inp = weight.shape[0] // groups, weight.shape[1]
        parts = []
        for w, b in zip(weight.split(out), bias.split(out) if bias is not None else [None] * groups):
            lin = nn.Linear(inp, out, bias=b is not None)
            lin.weight = as_param(w.clone())
            if b is not None:
                lin.bias = as_param(b.clone())
            parts.append(lin)
        return GroupedLinear(parts, "alpha")
    new = copy.deepcopy(first)
    new.weight = as_param(weight.clone())
    new.bias = as_param(bias.clone()) if bias is not None else None
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape
    else:
        new.out_channels, new.groups = weight.shape[0], groups
        new.in_channels = weight.shape[1] * groups
    return new


class AlphaRewriter(AlphaViews, BatchRewriter):
    """The batched rewrite with a mixed channel layout: shared ops pass through, weight layers and norms are
    assembled from the fused/isolated split of their groups."""

    def __init__(self, models: list[nn.Module], spec: PermSpec, layouts: dict, combine: str) -> None:
        super().__init__(models, combine, head_outputs=False)
        self.spec, self.layouts, self.models = spec, layouts, models
        self.init_alpha_views()

    def out_layout(self, name: str, width: int) -> Layout:
        axes = self.spec.params.get(f"{name}.weight")
        segments = axes[0] if axes else None
        if segments is None:  # never permuted (the output): one copy per model, combined at the end
            return Layout(None, torch.zeros(0, dtype=torch.long), torch.arange(width))
        if any(a.group is None for a in segments):
            raise UnsupportedModelError(name, "layer", "some of its outputs are never permuted, some are")
        return tensor_layout(segments, self.layouts, name)

    def in_columns(self, name: str, layout: Layout | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Input columns of the fused and of the isolated units (repeated per spatial position after a flatten)."""
        if layout is None:
            return None
        segments = self.spec.params[f"{name}.weight"][1]
        repeat = segments[0].repeat if segments and len({a.repeat for a in segments}) == 1 else 1
        return expand(layout.fused, repeat), expand(layout.isolated, repeat)

    def copy_per_member(self, new: fx.Node) -> fx.Node:
        raise UnsupportedModelError(new.name, "operand", "a tensor shared by all models meets partially fused "
                                    "channels; neuron-level fusion cannot place it")

    def visit_module(self, node: fx.Node, mods: list[nn.Module]):
        first = mods[0]
        src = node.args[0] if node.args else None
        x = self.env[src] if isinstance(src, fx.Node) else None
        layout = self.layout.get(x) if x in self.batched else None
        name = node.target
        conv = isinstance(first, (nn.Conv1d, nn.Conv2d))
        if isinstance(first, nn.Linear) or (conv and first.groups == 1):
            module, out = self.mixed_layer(node, mods, layout)
        elif (conv and not first.groups == first.in_channels == first.out_channels) or (
                isinstance(first, nn.GroupNorm) and 1 < first.num_groups < first.num_channels and layout is not None):
            module, out = self.blockwise(node, mods, layout, conv)
        elif conv and layout is not None:
            module, out = self.channelwise(node, mods, layout, conv=True), layout
        elif isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d)) and layout is not None:
            module, out = self.channelwise(node, mods, layout, conv=False), layout
        elif isinstance(first, (nn.LayerNorm, nn.GroupNorm)) and layout is not None:
            raise UnsupportedModelError(node.name, type(first).__name__, "normalises across units, so fused and "
                                        "isolated units cannot be normalised separately; use depth= instead")
        else:
            return super().visit_module(node, mods)
        if out is None:  # folded into the combined output
            self.owned[name] = module
            return self.emit("call_module", name, (x,), {}, batched=False)
        self.owned[name] = module
        return self.emit("call_module", name, (x,), {}, batched=True, layout=out)

    def mixed_layer(self, node: fx.Node, mods: list[nn.Module], layout: Layout | None):
        n, first, name = self.n, mods[0], node.target
        ws = [m.weight.detach() for m in mods]
        bs = [m.bias.detach() for m in mods] if first.bias is not None else None
        out = self.out_layout(name, ws[0].shape[0])
        fold = out.group is None and self.folds(node)
        fused_rows = torch.arange(ws[0].shape[0]) if fold else out.fused
        iso_rows = torch.zeros(0, dtype=torch.long) if fold else out.isolated
        cols = self.in_columns(name, layout)
        fused = from_fused = from_iso = None
        if len(fused_rows):
            if cols is None:
                w = torch.stack([w[fused_rows] for w in ws]).mean(0)
            else:
                fc, ic = cols
                w = torch.cat([torch.stack([w[fused_rows][:, fc] for w in ws]).mean(0)] +
                              [w[fused_rows][:, ic] / n for w in ws], 1)
            b = torch.stack([b[fused_rows] for b in bs]).mean(0) if bs else None
            fused = _like(first, w, b)
        if len(iso_rows):
            b = cat_copy([b[iso_rows] for b in bs]) if bs else None
            if cols is None:
                from_fused = _like(first, cat_copy([w[iso_rows] for w in ws]), b)
            else:
                fc, ic = cols
                if len(fc):
                    from_fused = _like(first, cat_copy([w[iso_rows][:, fc] for w in ws]), b)
                if len(ic):
                    from_iso = _like(first, cat_copy([w[iso_rows][:, ic] for w in ws]), None if len(fc) else b, groups=n)
        split = None if cols is None else len(cols[0])
        if fold:
            self.combined = True
            return MixedLayer(fused, None, None, split), None
        return MixedLayer(fused, from_fused, from_iso, split), out

    def blockwise(self, node: fx.Node, mods: list[nn.Module], layout: Layout | None, conv: bool):
        """A grouped conv, or a GroupNorm of blocks, on its family's layout (whole blocks fused or isolated, see
        select.py): each fused block is the mean over the models, each isolated block every model's own, so the
        layer stays grouped, one group per block of the new layout."""
        first = mods[0]
        if layout is None:
            raise UnsupportedModelError(node.name, type(first).__name__, "a grouped convolution on the shared input "
                                        "has no neuron-level form; use depth= instead")
        out = self.out_layout(node.target, first.out_channels) if conv else layout
        blocks = first.groups if conv else first.num_groups
        if out.group is None:
            raise UnsupportedModelError(node.name, type(first).__name__, "a grouped layer producing the output")

        def block_ids(units: torch.Tensor, size: int) -> torch.Tensor:
            return units.reshape(-1, size // blocks)[:, 0] // (size // blocks)

        size = len(out.fused) + len(out.isolated)
        fused_ids, iso_ids = block_ids(out.fused, size), block_ids(out.isolated, size)
        in_size = len(layout.fused) + len(layout.isolated)
        if not (torch.equal(block_ids(layout.fused, in_size), fused_ids)
                and torch.equal(block_ids(layout.isolated, in_size), iso_ids)):
            raise UnsupportedModelError(node.name, type(first).__name__, "its input and output fuse different blocks")

        def assemble(tensors: list[torch.Tensor]) -> torch.Tensor:
            per = [t.detach().reshape(blocks, -1, *t.shape[1:]) for t in tensors]
            fused = torch.stack([t[fused_ids] for t in per]).mean(0)
            return torch.cat([fused] + [t[iso_ids] for t in per]).reshape(-1, *tensors[0].shape[1:])

        new, total = copy.deepcopy(first), len(fused_ids) + self.n * len(iso_ids)
        new.weight = as_param(assemble([m.weight for m in mods]))
        if first.bias is not None:
            new.bias = as_param(assemble([m.bias for m in mods]))
        if conv:
            new.in_channels, new.out_channels = total * first.in_channels // blocks, new.weight.shape[0]
            new.groups = total
        else:
            new.num_groups, new.num_channels = total, new.weight.shape[0]
        return new, out

    def channelwise(self, node: fx.Node, mods: list[nn.Module], layout: Layout, conv: bool) -> nn.Module:
        """Depthwise convs and BatchNorm: per channel, the mean over models for fused units, each model's own
        parameters for its isolated units."""
        first = mods[0]

        def assemble(tensors: list[torch.Tensor]) -> torch.Tensor:
            fused = torch.stack([t[layout.fused] for t in tensors]).mean(0)
            return torch.cat([fused] + [t[layout.isolated] for t in tensors])

        new = copy.deepcopy(first)
        width = len(layout.fused) + self.n * len(layout.isolated)
        if conv:
            if not first.groups == first.in_channels == first.out_channels:
                raise UnsupportedModelError(node.name, type(first).__name__, "grouped convolution")
            new.weight = as_param(assemble([m.weight.detach() for m in mods]))
            new.in_channels = new.out_channels = new.groups = width
        else:
            new.num_features = width
            for buf in ("running_mean", "running_var"):
                if getattr(first, buf) is not None:
                    setattr(new, buf, assemble([getattr(m, buf) for m in mods]))
        for p in ("weight", "bias") if not conv else ("bias",):
            if getattr(first, p, None) is not None:
                setattr(new, p, as_param(assemble([getattr(m, p).detach() for m in mods])))
        return new


def fuse_alpha(aligned: list[nn.Module], spec: PermSpec, alpha: float | Mapping[str, float],
               combine: str = DEFAULT_COMBINE,
               select: str = DEFAULT_SELECT) -> tuple[fx.GraphModule, dict, list[nn.Module]]:
    """The partially fused network, the layouts it used and the models it fused (re-matched by "partial-ot"). The
    models must be aligned (ef.align)."""
    models, layouts = choose_layouts(list(aligned), spec, alpha, select)
    with torch.no_grad():
        return AlphaRewriter(models, spec, layouts, combine).run(), layouts, models
