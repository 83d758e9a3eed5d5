"""How each layer ties the permutation groups of its input and output channels: Linear and Conv (a new group),
depthwise convs (the input's group), grouped convs (a new group in one family of blocks with the input's), norms."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..base.errors import UnsupportedModelError
from .layouts import LAYOUTS
from .trace import _SAME, POOLS, tensor_shape


class LayerVisits:
    """Mixed into GroupTracer, which provides bind, new_group, value, ties, grouped and weight_layers."""

    def visit_module(self, node: fx.Node, mod: nn.Module, src):
        tokens_out = isinstance(mod, nn.Linear) and len(tensor_shape(node) or ()) >= 3
        if isinstance(src, LAYOUTS) or tokens_out or isinstance(mod, nn.MultiheadAttention) and src is not None:
            if isinstance(mod, _SAME) and not isinstance(mod, POOLS):
                return src
            return self.visit_token_module(node, mod, src)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == mod.in_channels == mod.out_channels > 1:
            return self.visit_depthwise(node, mod, src)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups != 1:
            return self.visit_grouped(node, mod, src)
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            return self.visit_layer(node, mod, src)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            return self.visit_norm(node, mod, src)
        if isinstance(mod, _SAME):
            return src
        if isinstance(mod, nn.Flatten):
            return self.visit_flatten(node, src) if src is not None else None
        if not any(self.value.get(n) for n in node.all_input_nodes):
            return None  # a module on tensors that are never permuted needs nothing
        raise UnsupportedModelError(node.name, type(mod).__name__)

    def visit_layer(self, node: fx.Node, mod: nn.Module, src):
        """A Linear or Conv: its output units are a new group; its input axis takes the input's groups."""
        name, w = node.target, mod.weight
        if src is not None:
            self.bind(f"{name}.weight", w.ndim, 1, src, node)
        out = self.new_group(name, w.shape[0])
        self.bind(f"{name}.weight", w.ndim, 0, out, node)
        if mod.bias is not None:
            self.bind(f"{name}.bias", 1, 0, out, node)
        self.weight_layers.append(node)
        return out

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
        if src is not None and (len(src) != 1 or src[0].repeat != 1 or src[0].stride != 1):
            raise UnsupportedModelError(node.name, type(mod).__name__, "grouped convolution over concatenated, "
                                        "shuffled or flattened channels")
        out = self.visit_layer(node, mod, src)
        if len(out) != 1:
            raise UnsupportedModelError(node.name, type(mod).__name__, "grouped convolution whose outputs are split")
        self.grouped[f"{node.target}.weight"] = (mod.groups, mod.in_channels)
        self.ties.append((src[0].group if src is not None else None, out[0].group, mod.groups, node))
        return out

    def visit_norm(self, node: fx.Node, mod: nn.Module, src):
        if src is None:
            return None
        if isinstance(mod, nn.LayerNorm) and (len(mod.normalized_shape) != 1 or len(tensor_shape(node.args[0])) != 2):
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
