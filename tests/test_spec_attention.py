"""Specs of transformers: attention's head groups derived from the graph, and variants that cannot be proved refused."""
import pytest
import torch
from torch import nn

import edgefuse as ef

from . import attention_nets as an

VisionTransformer = an.torchvision_vit()
needs_torchvision = pytest.mark.skipif(VisionTransformer is None, reason="torchvision's models do not import here")


def small_torchvision_vit():
    model = VisionTransformer(image_size=8, patch_size=2, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    return model


MAKERS = {"timm-style": lambda: an.TinyViT(an.TimmAttention), "by hand": lambda: an.TinyViT(an.HandAttention),
          "single head": lambda: an.TinyViT(an.HandAttention, heads=1), "channels-last": an.ConvNeXtBlock,
          "torchvision": pytest.param(small_torchvision_vit, marks=needs_torchvision)}


def assert_keeps_function(model: nn.Module, x: torch.Tensor, seed: int) -> ef.PermSpec:
    spec = ef.permutation_spec(model, x)
    permuted = ef.permute(model, spec, spec.random_perms(seed))
    with torch.no_grad():
        ref, out = model(x), permuted(x)
    assert not torch.equal(ref, out) or seed < 0  # float sums reorder: bit-equal outputs would mean nothing moved
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    return spec


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_random_permutations_along_the_spec_keep_a_transformer_function(make, seed):
    torch.manual_seed(seed)
    model = an.randomize_norms(make().eval(), seed)
    spec = assert_keeps_function(model, torch.rand(3, 1, 8, 8) if make is not small_torchvision_vit
                                 else torch.rand(3, 3, 8, 8), seed)
    heads = {"timm-style": 4, "by hand": 4, "single head": 1, "torchvision": 4}.get(
        next((k for k, v in MAKERS.items() if v is make), None), 4)
    if make is not an.ConvNeXtBlock:
        assert len(spec.families) == 2 and all(f.blocks == heads and len(f.groups) == 2 for f in spec.families)
        assert len(spec.groups) == 7  # the residual stream, and per block: q·k, v, the MLP's hidden units


def test_position_embedding_and_class_token_follow_the_residual_stream():
    spec = ef.permutation_spec(an.TinyViT(), torch.rand(2, 1, 8, 8))
    residual = spec.params["embed.weight"][0][0].group
    assert spec.params["cls"][2][0].group == residual and spec.params["pos"][2][0].group == residual
    assert spec.params["cls"][:2] == (None, None) and spec.params["norm.weight"][0][0].group == residual
    assert len(spec.cut_points) == 6  # before each block's attention and MLP, before the final norm and the head


@needs_torchvision
def test_vit_b_16_has_313_permutations_and_keeps_its_function():
    from torchvision.models.vision_transformer import vit_b_16
    torch.manual_seed(0)
    model = vit_b_16().eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    spec = assert_keeps_function(model, torch.rand(1, 3, 224, 224), 3)
    tied = {g for f in spec.families for g in f.groups}
    count = sum(1 + len(f.groups) * f.blocks for f in spec.families) + len(set(spec.groups) - tied)
    assert count == 313 and {f.blocks for f in spec.families} == {12}
    packed = spec.params["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"][0]
    assert [a.group for a in packed][0] == packed[1].group != packed[2].group  # Q and K rows share, V rows differ


REFUSED = {"qk-norm": (lambda: an.TinyViT(an.TimmAttention, qk_norm=True), "LayerNorm"),
           "rotary": (lambda: an.TinyViT(an.HandAttention, rotary=True), "mul"),
           "grouped-query": (lambda: an.TinyViT(an.HandAttention, kv_heads=2), "repeat_interleave")}


@pytest.mark.parametrize("make,op", REFUSED.values(), ids=REFUSED.keys())
def test_attention_variants_that_cannot_be_proved_are_refused_by_node(make, op):
    with pytest.raises(ef.UnsupportedModelError) as err:
        ef.permutation_spec(make(), torch.rand(2, 1, 8, 8))
    assert f"(op {op})" in str(err.value) and "node '" in str(err.value)


def test_attention_with_separate_key_widths_is_refused():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.kv = nn.Linear(8, 8), nn.Linear(8, 4)
            self.attn, self.head = nn.MultiheadAttention(8, 2, kdim=4, vdim=4), nn.Linear(8, 2)

        def forward(self, x):
            x = x.reshape(x.shape[0], 8, 8)
            h, kv = self.a(x), self.kv(x)
            return self.head(self.attn(h, kv, kv)[0].mean(1))

    with pytest.raises(ef.UnsupportedModelError, match="MultiheadAttention"):
        ef.permutation_spec(Cross(), torch.rand(2, 1, 8, 8))
