import pytest
import torch

import edgefuse as ef
from edgefuse.models import data, zoo
from edgefuse.fuse.split import average_state

from . import nets


def _merged(models, spec):
    m = ef.permute(models[0], spec, spec.identity_perms())
    m.load_state_dict(average_state(models))
    return m


def _loss_acc(model, x, y):
    with torch.no_grad():
        out = model(x)
    return torch.nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("which", ["mlps", "cnns"])
def test_aligned_models_compute_the_same_function(which, request, digits_split):
    models = request.getfixturevalue(which)
    _, x, _ = digits_split
    spec = ef.permutation_spec(models[0], x[:2])
    aligned = ef.align(models, spec)
    with torch.no_grad():
        for m, a in zip(models, aligned):
            torch.testing.assert_close(a(x), m(x), atol=1e-5, rtol=1e-5)
    for k, v in models[0].state_dict().items():
        assert torch.equal(aligned[0].state_dict()[k], v)


METHODS = [("weight", {}), ("activation", {}), ("ot", {}), ("ot", {"reg": 0.05})]


def _options(method, options, calib):
    return dict(options, data=data.batches(calib, batch_size=250)) if method == "activation" else options


@pytest.mark.parametrize("method,options", METHODS)
def test_alignment_halves_the_barrier(method, options, mlps, digits_split):
    calib, x, y = digits_split
    pair = mlps[:2]
    spec = ef.permutation_spec(pair[0], x[:2])
    labelled = data.batches(x, y)
    naive = ef.barrier(*pair, labelled)["loss_barrier"]
    aligned = ef.barrier(*ef.align(pair, spec, method, **_options(method, options, calib)), labelled)
    assert naive > 0 and aligned["loss_barrier"] <= naive / 2
    assert aligned["loss"][0] == pytest.approx(_loss_acc(pair[0], x, y)[0], rel=1e-5)


@pytest.mark.parametrize("method,options", METHODS)
def test_matched_merge_of_four_beats_naive_average(method, options, mlps, digits_split):
    calib, x, y = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    naive = _loss_acc(_merged(mlps, spec), x, y)[1]
    matched = _loss_acc(_merged(ef.align(mlps, spec, method, **_options(method, options, calib)), spec), x, y)[1]
    assert matched > naive + 0.1


@pytest.mark.parametrize("method,options", METHODS)
def test_alignment_is_deterministic(method, options, mlps, digits_split):
    calib, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    opts = _options(method, options, calib)
    a, b = ef.align_perms(mlps, spec, method, seed=3, **opts), ef.align_perms(mlps, spec, method, seed=3, **opts)
    assert all(torch.equal(p[g], q[g]) for p, q in zip(a, b) for g in p)


ZOO = [("mlp", 16), ("cnn", 4), ("resnet20", 4), ("mobilenetv2", 4), ("resnet18", 4)]


@pytest.mark.parametrize("arch,width", ZOO)
@pytest.mark.parametrize("method,options", METHODS)
def test_every_zoo_architecture_aligns_without_changing_functions(arch, width, method, options):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(nets.randomize_bn(zoo.build(arch, width=width), seed))
    x = torch.rand(16, 1, 28, 28)
    spec = ef.permutation_spec(models[0], x[:2])
    opts = dict(options, data=[torch.rand(32, 1, 28, 28)]) if method == "activation" else options
    perms = ef.align_perms(models, spec, method, **opts)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms[1].values())
    with torch.no_grad():
        for m, p in zip(models, perms):
            torch.testing.assert_close(ef.permute(m, spec, p)(x), m(x), atol=1e-5, rtol=1e-4)


def test_bad_align_arguments(mlps, digits_split):
    _, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    with pytest.raises(ef.EdgefuseError, match="unknown alignment method"):
        ef.align(mlps, spec, method="magic")
    with pytest.raises(ef.EdgefuseError, match="at least 2"):
        ef.align(mlps[:1], spec, data=data.batches(x))


def test_activation_matching_needs_data(mlps, digits_split):
    _, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    with pytest.raises(ef.EdgefuseError, match="activation matching needs calibration data"):
        ef.align(mlps, spec, method="activation")


def test_barrier_needs_labels(mlps, digits_split):
    _, x, _ = digits_split
    with pytest.raises(ef.EdgefuseError, match="labelled data"):
        ef.barrier(mlps[0], mlps[1], [x])


def _resnets(n: int, width: int = 8) -> tuple[list, object]:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(nets.randomize_bn(zoo.resnet20(width=width), seed).eval())
    return models, ef.permutation_spec(models[0], torch.rand(2, 1, 28, 28))


def test_cached_unit_rows_equal_rows_of_the_permuted_tensor():
    from edgefuse.align.weight import _float_params, _Rows, unit_rows
    from edgefuse.spec.permspec import permute_state
    models, spec = _resnets(1)
    state = _float_params(models[0], spec)
    perms = spec.random_perms(3)
    members = {g: [m for m in spec.members(g) if m[0] in state] for g in spec.groups}
    rows = _Rows(state, spec, members)
    for g, ms in members.items():
        others = dict(perms, **{g: torch.arange(spec.groups[g])})  # only the other axes move
        moved = permute_state(state, spec, others)
        for m in ms:
            name, axis, seg = m
            assert torch.equal(rows.get(g, m, perms), unit_rows(moved[name], axis, seg))


def test_merge_many_rounds_only_raise_the_objective_and_recover_a_hidden_permutation():
    models, spec = _resnets(4)
    hidden = spec.random_perms(7)
    twin = ef.permute(models[0], spec, hidden)  # models[0] in another order: weight matching must undo it
    history = []
    perms = ef.align_perms([models[0], twin, *models[1:]], spec, "weight", history=history)
    assert len(history) >= 2 and all(b >= a - 1e-9 * abs(a) for a, b in zip(history, history[1:]))
    for g, p in perms[1].items():
        assert torch.equal(hidden[g][p], torch.arange(spec.groups[g]))


def test_block_assignment_is_the_best_permutation_that_keeps_blocks_whole():
    import itertools

    import numpy as np

    from edgefuse.align.blocks import assign
    from edgefuse.align.weight import lsa
    from edgefuse.spec.permspec import Family

    rng = np.random.default_rng(0)
    sims = [rng.normal(size=(6, 6)), rng.normal(size=(9, 9))]  # two groups of 3 blocks: widths 2 and 3

    def value(cols):
        return sum(s[np.arange(len(s)), c].sum() for s, c in zip(sims, cols))

    def block_structured(width):  # every permutation that moves whole blocks of `width`
        for sigma in itertools.permutations(range(3)):
            for inner in itertools.product(itertools.permutations(range(width)), repeat=3):
                yield sigma, np.concatenate([s * width + np.array(p) for s, p in zip(sigma, inner)])

    best = max(value([a, b]) for sa, a in block_structured(2) for sb, b in block_structured(3) if sa == sb)
    found = assign(sims, Family(("a", "b"), 3), lsa)
    assert np.isclose(value(found), best)
    assert all(sorted(c.reshape(3, -1).min(1) // (len(c) // 3)) == [0, 1, 2] for c in found)
    fixed = assign(sims, Family(("a", "b"), 3, fixed=True), lsa)
    assert all((c.reshape(3, -1) // (len(c) // 3) == np.arange(3)[:, None]).all() for c in fixed)


@pytest.mark.parametrize("method", ["weight", "ot"])
@pytest.mark.parametrize("net", [nets.RegNetBlock, nets.ShuffleNetBlock])
def test_weight_matching_undoes_a_hidden_permutation_of_grouped_and_shuffled_nets(method, net):
    models = [nets.member(net, s) for s in range(3)]
    spec = ef.permutation_spec(models[0], torch.rand(2, 1, 8, 8))
    hidden = spec.random_perms(4)
    twin = ef.permute(models[0], spec, hidden)
    perms = ef.align_perms([models[0], twin, *models[1:]], spec, method)
    for g, p in perms[1].items():
        assert torch.equal(hidden[g][p], torch.arange(spec.groups[g]))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        for m, p in zip(models[1:], perms[2:]):
            torch.testing.assert_close(ef.permute(m, spec, p)(x), m(x), atol=1e-5, rtol=1e-4)
