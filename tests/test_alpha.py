"""Neuron-level partial fusion (alpha) and the repairs."""
import math

import pytest
import torch

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.fuse.repair import _channel_stats

from . import nets

X = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
ARCHS = {"mlp": lambda: zoo.mlp(width=24, depth=2), "cnn-bn": lambda: zoo.cnn(width=4),
         "resnet": lambda: zoo.resnet20(width=4), "depthwise-se": lambda: zoo.mobilenetv2(width=4, expand=2),
         "grouped": nets.RegNetBlock, "shuffle": nets.ShuffleNetBlock}


def _aligned(arch, n=3):
    models = [nets.member(ARCHS[arch], s) for s in range(n)]
    spec = ef.permutation_spec(models[0], X[:2])
    return ef.align(models, spec), spec


@pytest.mark.parametrize("arch", list(ARCHS))
def test_alpha_ends_are_the_ensemble_and_the_full_merge(arch):
    aligned, spec = _aligned(arch)
    with torch.no_grad():
        ens = ef.ensemble(aligned)(X)
        full = ef.fuse(aligned, spec, depth=len(spec.cut_points), repair=None)(X)
        one = ef.fuse(aligned, spec, alpha=1.0, repair=None)(X)
        zero = ef.fuse(aligned, spec, alpha=0.0, repair=None)(X)
    assert float((one - ens).abs().max() / ens.abs().max()) <= 1e-5
    assert float((zero - full).abs().max() / full.abs().max()) <= 1e-5


def test_alpha_over_a_hidden_cat_ends_at_the_ensemble_and_the_full_merge():
    x = X[:, :, :8, :8]
    models = [nets.member(nets.HiddenCat, s) for s in range(3)]
    spec = ef.permutation_spec(models[0], x[:2])
    aligned = ef.align(models, spec)
    with torch.no_grad():
        ens, full = ef.ensemble(aligned)(x), ef.fuse(aligned, spec, depth=len(spec.cut_points), repair=None)(x)
        assert float((ef.fuse(aligned, spec, alpha=1.0, repair=None)(x) - ens).abs().max()) <= 1e-5
        assert float((ef.fuse(aligned, spec, alpha=0.0, repair=None)(x) - full).abs().max()) <= 1e-5
        half = ef.fuse(aligned, spec, alpha=0.5, repair=None)(x)
    assert float((half - ens).abs().max()) > 1e-3 and float((half - full).abs().max()) > 1e-3


@pytest.mark.parametrize("arch", ["cnn-bn", "resnet", "grouped", "shuffle"])
def test_macs_equal_the_ensemble_at_one_and_fall_with_alpha(arch):
    aligned, spec = _aligned(arch, 4)
    ens = ef.macs(ef.ensemble(aligned), X)
    costs = [ef.macs(ef.fuse(aligned, spec, alpha=a, repair=None, dense=False), X)  # the blocks alone
             for a in (1, .75, .5, .25, .1, 0)]
    assert costs[0] == ens and costs[-1] == ef.macs(aligned[0], X)
    assert all(a > b for a, b in zip(costs, costs[1:]))


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 0.75])
def test_widths_follow_the_documented_rounding(alpha):
    aligned, spec = _aligned("cnn-bn", 4)
    fused = ef.fuse(aligned, spec, alpha=alpha, repair=None)
    for g, n in spec.groups.items():
        isolated = math.floor(alpha * n + 0.5)
        assert fused.widths[g] == n - isolated + 4 * isolated
        assert abs(fused.widths[g] - n * (1 + 3 * alpha)) <= 3 * 0.5 + 1e-9


def test_alpha_per_group_and_bad_values():
    aligned, spec = _aligned("mlp")
    groups = list(spec.groups)
    fused = ef.fuse(aligned, spec, alpha={groups[0]: 1.0}, repair=None)
    assert fused.widths[groups[0]] == 3 * spec.groups[groups[0]]
    assert all(fused.widths[g] == spec.groups[g] for g in groups[1:])
    with pytest.raises(ef.EdgefuseError, match="between 0 and 1"):
        ef.fuse(aligned, spec, alpha=1.5)
    with pytest.raises(ef.EdgefuseError, match="unknown group"):
        ef.fuse(aligned, spec, alpha={"nope": 0.5})
    with pytest.raises(ef.EdgefuseError, match="not both"):
        ef.fuse(aligned, spec, alpha=0.5, depth=1)
    with pytest.raises(ef.EdgefuseError, match="unknown repair 'magic'"):
        ef.fuse(aligned, spec, alpha=0.5, repair="magic")


def test_alpha_model_exports_with_parity(tmp_path):
    aligned, spec = _aligned("resnet")
    fused = ef.fuse(aligned, spec, alpha=0.3, data=[X])
    path = ef.export_onnx(fused, X[:2], tmp_path / "a.onnx", opset=17)  # parity at batch 1 and 3 inside
    assert path.is_file()


def test_alpha_refuses_layernorm():
    def net():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.LayerNorm(16),
                                   torch.nn.ReLU(), torch.nn.Linear(16, 10))

    models = [nets.member(net, s) for s in range(2)]
    spec = ef.permutation_spec(models[0], X[:2, :, :8, :8])
    with pytest.raises(ef.UnsupportedModelError, match="LayerNorm"):
        ef.fuse(models, spec, alpha=0.5, repair=None)


def test_alpha_beats_naive_on_trained_models(mlps, digits_split):
    calib, x, y = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    aligned = ef.align(mlps, spec)

    def acc(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    full = acc(ef.fuse(aligned, spec, alpha=0.0, repair=None))
    half = acc(ef.fuse(aligned, spec, alpha=0.5, repair=None))
    assert half >= full - 0.01 and acc(ef.fuse(aligned, spec, alpha=1.0)) == acc(ef.ensemble(mlps))


def test_repair_restores_parent_statistics(mlps, digits_split):
    calib, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    aligned = ef.align(mlps, spec)
    before = ef.fuse(aligned, spec, depth=len(spec.cut_points), repair=None)
    after = ef.fuse(aligned, spec, depth=len(spec.cut_points), data=data.batches(calib), repair="repair")
    name = spec.weight_layers[1]
    stds = torch.stack([_channel_stats(m, m.get_submodule(name), [calib])[1] for m in aligned]).mean(0)
    for model, far in ((before, True), (after, False)):
        std = _channel_stats(model, model.trunk.get_submodule(name), [calib])[1]
        err = float(((std - stds).abs() / stds.clamp_min(1e-6)).median())
        assert (err > 0.05) if far else (err < 0.02)


def test_distill_moves_towards_the_ensemble_and_leaves_inputs_alone(cnns, digits_split):
    calib, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    aligned = ef.align(cnns, spec)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in aligned]
    with torch.no_grad():
        target = torch.log_softmax(ef.ensemble(aligned)(x), -1)

    def kl(m):
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(torch.log_softmax(m(x), -1), target, log_target=True,
                                                    reduction="batchmean"))

    plain = ef.fuse(aligned, spec, alpha=0.25, data=data.batches(calib), repair="bn")  # where distill starts
    distilled = ef.fuse(aligned, spec, alpha=0.25, data=data.batches(calib), repair="distill", steps=60)
    assert kl(distilled) < 0.7 * kl(plain)
    for m, b in zip(aligned, before):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())


def test_partial_ot_matches_better_than_the_cost_ranking_and_keeps_functions():
    from edgefuse.fuse.select import choose_layouts, unit_features

    aligned, spec = _aligned("mlp", 2)
    group, k = next(iter(spec.groups)), 6
    alpha = {group: k / spec.groups[group]}

    def matched_similarity(models, layout):  # weight matching's objective over the fused pairs
        f = unit_features(models, spec, group, scaled=False)
        return float((f[0] * f[1]).sum(-1)[layout.fused].sum())

    kept, by_cost = choose_layouts(aligned, spec, alpha, "cost")
    moved, by_ot = choose_layouts(aligned, spec, alpha, "partial-ot")
    assert len(by_ot[group].isolated) == k and len(by_ot[group].fused) == spec.groups[group] - k
    assert matched_similarity(moved, by_ot[group]) > matched_similarity(kept, by_cost[group])
    with torch.no_grad():
        for before, after in zip(aligned, moved):
            assert torch.allclose(before(X), after(X), atol=1e-6)


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_partial_ot_selection_fuses_n_models(arch):
    aligned, spec = _aligned(arch, 3)
    with torch.no_grad():
        ens = ef.ensemble(aligned)(X)
        one = ef.fuse(aligned, spec, alpha=1.0, repair=None, select="partial-ot")(X)
    assert float((one - ens).abs().max() / ens.abs().max()) <= 1e-5
    half = ef.fuse(aligned, spec, alpha=0.5, repair=None, select="partial-ot")
    assert half.widths == {g: n - math.floor(n / 2 + .5) + 3 * math.floor(n / 2 + .5) for g, n in spec.groups.items()}
    assert ef.macs(half, X) < ef.macs(ef.ensemble(aligned), X)
    with pytest.raises(ef.EdgefuseError, match="unknown unit selection"):
        ef.fuse(aligned, spec, alpha=0.5, select="greedy")
