"""Layers over tokens and attention heads: Linear and LayerNorm on the last axis, and nn.MultiheadAttention read as
one layer whose packed in_proj stacks Q, K and V rows."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .channels import shift
from .layouts import Heads, Parts, Tokens
from .trace import tensor_shape


class AttentionVisits:
    """Mixed into GroupTracer (with TokenVisits, which provides `refuse`)."""

    def visit_token_module(self, node: fx.Node, mod: nn.Module, src):
        """A module over channels-last inputs: Linear and LayerNorm on the last axis, attention as one layer."""
        if isinstance(mod, nn.MultiheadAttention):
            return self.visit_mha(node, mod)
        if isinstance(mod, nn.Linear) and (src is None or isinstance(src, Tokens)):
            segs = self.visit_layer(node, mod, None if src is None else src.segs)
            return Tokens(segs, len(tensor_shape(node) or ()))
        if isinstance(src, Tokens) and isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            for p in ("weight", "bias"):
                if getattr(mod, p) is not None:
                    self.bind(f"{node.target}.{p}", 1, 0, src.segs, node)
            return src
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) and isinstance(src, Heads):
            self.refuse(node, "normalisation within heads (qk-norm) is not supported")
        if isinstance(mod, nn.Softmax):
            return src
        self.refuse(node, "a layer over tokens or attention heads that is not Linear, LayerNorm or attention")

    def visit_mha(self, node: fx.Node, mod: nn.MultiheadAttention):
        """nn.MultiheadAttention: in_proj_weight stacks Q, K and V rows (3E × E); Q and K rows share one group (they
        are contracted together), V rows and out_proj's columns another, and both move their heads together."""
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            self.refuse(node, "attention with separate key/value widths, bias_k/bias_v or add_zero_attn")
        inputs = [self.value.get(n) if isinstance(n, fx.Node) else None for n in node.args[:3]]
        if any(not isinstance(v, Tokens) for v in inputs) or any(
                self.value.get(n) is not None for n in node.all_input_nodes if n not in node.args[:3]):
            self.refuse(node, "attention whose query, key and value are not all token tensors, or a mask that "
                        "carries channels")
        name, e = node.target, mod.embed_dim
        qk, v = self.new_group(f"{name}.qk", e), self.new_group(f"{name}.v", e)
        rows = tuple(qk) + shift(qk, e) + shift(v, 2 * e)
        for x in inputs:
            self.bind(f"{name}.in_proj_weight", 2, 1, x.segs, node)
        self.bind(f"{name}.in_proj_weight", 2, 0, rows, node)
        if mod.in_proj_bias is not None:
            self.bind(f"{name}.in_proj_bias", 1, 0, rows, node)
        out = self.new_group(f"{name}.out_proj", e)
        self.bind(f"{name}.out_proj.weight", 2, 1, v, node)
        self.bind(f"{name}.out_proj.weight", 2, 0, out, node)
        if mod.out_proj.bias is not None:
            self.bind(f"{name}.out_proj.bias", 1, 0, out, node)
        self.ties.append((qk[0].group, v[0].group, mod.num_heads, node))
        return Parts([Tokens(out, inputs[0].ndim), None])
