import pytest
import torch

import edgefuse as ef
from edgefuse.models import zoo

from . import nets

CASES = [(lambda: zoo.mlp(), (2, 1, 28, 28)), (lambda: zoo.cnn(), (2, 1, 28, 28)),
         (lambda: zoo.resnet20(width=4), (2, 1, 28, 28)), (lambda: zoo.mobilenetv2(width=4), (2, 1, 28, 28)),
         (nets.digits_cnn, (2, 1, 8, 8)), (nets.Residual, (2, 1, 8, 8)), (nets.HiddenCat, (2, 1, 8, 8)),
         (lambda: nets.StochasticDepthBlock().eval(), (2, 1, 8, 8)), (nets.RegNetBlock, (2, 1, 8, 8)),
         (nets.GroupedConv, (2, 1, 8, 8)), (nets.BlockGroupNorm, (2, 1, 8, 8)), (nets.ShuffleNetBlock, (2, 1, 8, 8)),
         (nets.TinyViTBlock, (2, 1, 8, 8))]


@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_permutation_keeps_function(make, shape, seed):
    torch.manual_seed(seed)
    model = nets.randomize_bn(make(), seed)
    x = torch.rand(shape)
    spec = ef.permutation_spec(model, x)
    perms = spec.random_perms(seed)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = ef.permute(model, spec, perms)
    assert not torch.equal(permuted.state_dict()[next(iter(spec.params))], model.state_dict()[next(iter(spec.params))])
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)


def test_spec_groups_and_cut_points():
    spec = ef.permutation_spec(zoo.cnn(width=8), torch.rand(2, 1, 28, 28))
    assert sorted(spec.groups.values()) == [8, 8, 16, 16, 32]
    assert len(spec.cut_points) == 5  # one before every weight layer but the first
    flat = [a for axes in spec.params.values() for segments in axes for a in segments or () if a.repeat > 1]
    assert flat and flat[0].repeat == 49  # conv channels flattened over 7x7 into the classifier


def test_residual_add_ties_both_sides():
    spec = ef.permutation_spec(nets.Residual(), torch.rand(2, 1, 8, 8))
    assert spec.params["inp.weight"][0] == spec.params["g.weight"][0]
    assert spec.params["f.weight"][0] != spec.params["g.weight"][0]


def test_classifier_outputs_never_permuted():
    spec = ef.permutation_spec(zoo.mlp(), torch.rand(2, 1, 28, 28))
    assert spec.params["8.weight"][0] is None and "8.bias" not in spec.params


@pytest.mark.parametrize("make,op", [(nets.CatGrouped, "Conv2d"), (nets.InputCat, "cat")])
def test_unsupported_models_are_refused_by_node(make, op):
    with pytest.raises(ef.UnsupportedModelError) as err:
        ef.permutation_spec(make(), torch.rand(2, 1, 8, 8))
    assert f"(op {op})" in str(err.value) and "node '" in str(err.value)


def test_cat_gives_one_axis_two_segments():
    spec = ef.permutation_spec(nets.HiddenCat(), torch.rand(2, 1, 8, 8))
    segments = spec.params["head.weight"][1]
    assert [a.group for a in segments] == [spec.params["a.weight"][0][0].group, spec.params["b.weight"][0][0].group]
    assert [(p, seg.start) for p, _, seg in spec.members(segments[1].group)] == [("b.weight", 0), ("b.bias", 0),
                                                                                  ("head.weight", 16)]


def test_depthwise_and_squeeze_excite_share_the_block_units():
    spec = ef.permutation_spec(zoo.mobilenetv2(width=4), torch.rand(2, 1, 28, 28))
    expand = spec.params["6.block.0.weight"][0]
    assert spec.params["6.block.3.weight"][0] == expand  # depthwise filters follow their input channels
    assert spec.params["6.block.3.weight"][1] is None
    assert spec.params["6.block.6.expand.weight"][0] == expand  # the SE gate multiplies those channels


def test_resnet_shortcut_joins_the_residual_stream():
    spec = ef.permutation_spec(zoo.resnet20(width=4), torch.rand(2, 1, 28, 28))
    assert spec.params["7.shortcut.0.weight"][0] == spec.params["7.conv2.weight"][0] == \
        spec.params["8.conv2.weight"][0] == spec.params["9.bn2.weight"][0]
    assert spec.params["7.conv1.weight"][0] != spec.params["7.conv2.weight"][0]


def test_stochastic_depth_is_the_identity_in_eval_mode_only():
    model = nets.randomize_bn(nets.StochasticDepthBlock(), 0).eval()
    spec = ef.permutation_spec(model, torch.rand(2, 1, 8, 8))
    assert any(k.startswith("project") for k in spec.params)
    # traced as it is (permutation_spec itself would trace an eval copy): the training flag reaches the node
    from edgefuse.spec.groups import GroupTracer
    from edgefuse.spec.trace import trace
    with pytest.raises(ef.UnsupportedModelError, match="stochastic depth in training mode"):
        GroupTracer(trace(model.train(), torch.rand(2, 1, 8, 8))).run()


def test_grouped_convs_tie_their_groups_into_one_family_of_blocks():
    spec = ef.permutation_spec(nets.RegNetBlock(), torch.rand(2, 1, 8, 8))
    (family,) = spec.families
    assert family.blocks == 4 and not family.fixed
    assert set(family.groups) == {spec.params[f"{n}.0.weight"][0][0].group for n in ("a", "b", "b2")}
    assert dict(spec.grouped) == {"b.0.weight": (4, 16), "b2.0.weight": (4, 16)}
    for seed in range(3):  # random permutations move whole blocks, the same blocks in every group of the family
        perms = spec.random_perms(seed)
        sigmas = set()
        for g in family.groups:
            width = spec.groups[g] // family.blocks
            blocks = perms[g].reshape(family.blocks, width) // width
            assert (blocks == blocks[:, :1]).all()
            sigmas.add(tuple(blocks[:, 0].tolist()))
        assert len(sigmas) == 1


def test_a_grouped_conv_on_the_input_keeps_its_blocks_in_place():
    class FirstGrouped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(2, 8, 3, padding=1, groups=2)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)).mean((2, 3)))

    model, x = FirstGrouped(), torch.rand(3, 2, 8, 8)
    spec = ef.permutation_spec(model, x)
    assert spec.families[0].fixed
    perms = spec.random_perms(1)
    assert sorted(perms["a"][:4].tolist()) == [0, 1, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(ef.permute(model, spec, perms)(x), model(x), atol=1e-5, rtol=1e-5)


def test_channel_shuffle_interleaves_and_chunk_cuts_the_groups():
    spec = ef.permutation_spec(nets.ShuffleNetBlock(), torch.rand(2, 1, 8, 8))
    # the first unit's two branches (8 channels each) are interleaved by its shuffle: the next unit's chunk takes
    # the first 8 channels, units 0-3 of each branch, so both branches' outputs are cut in two
    assert {g for g in spec.groups if g.startswith("stage.0.branch1.1.0")} >= {"stage.0.branch1.1.0[0:1]"}
    reader = spec.params["stage.1.branch2.0.0.weight"][1]  # reads the second half of the shuffled channels
    assert sum(a.units for a in reader) == 8 and all(a.stride >= 2 for a in reader)
    assert sorted(a.start % 2 for a in reader) == sorted([0] * (len(reader) // 2) + [1] * (len(reader) - len(reader) // 2))


def test_channel_views_other_than_a_shuffle_are_refused():
    class GroupSum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Linear(4, 10)

        def forward(self, x):
            b, c, h, w = x.size()
            return self.head(self.a(x).view(b, 2, 4, h, w).sum(1).mean((2, 3)))

    with pytest.raises(ef.UnsupportedModelError, match="channel shuffle"):
        ef.permutation_spec(GroupSum(), torch.rand(2, 1, 8, 8))


def test_a_spec_pickles_to_a_worker_unchanged():
    import pickle

    model = zoo.resnet20(width=4)
    spec = ef.permutation_spec(model, torch.zeros(2, 1, 28, 28))
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and type(back.params).__name__ == "mappingproxy"
    perms = back.random_perms(1)
    model.eval()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(ef.permute(model, back, perms)(x), model(x), atol=1e-5, rtol=1e-5)
