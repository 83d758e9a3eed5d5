import pytest
import torch

import edgefuse as ef
from edgefuse import data
from edgefuse.fuse.split import average_state


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


def test_weight_matching_halves_the_barrier(mlps, digits_split):
    _, x, y = digits_split
    pair = mlps[:2]
    spec = ef.permutation_spec(pair[0], x[:2])
    ends = sum(_loss_acc(m, x, y)[0] for m in pair) / 2
    naive = _loss_acc(_merged(pair, spec), x, y)[0] - ends
    aligned = _loss_acc(_merged(ef.align(pair, spec), spec), x, y)[0] - ends
    assert naive > 0 and aligned <= naive / 2


def test_matched_merge_of_four_beats_naive_average(mlps, digits_split):
    _, x, y = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    naive = _loss_acc(_merged(mlps, spec), x, y)[1]
    matched = _loss_acc(_merged(ef.align(mlps, spec), spec), x, y)[1]
    assert matched > naive + 0.1


def test_alignment_is_deterministic(mlps, digits_split):
    _, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    a, b = ef.align_perms(mlps, spec, seed=3), ef.align_perms(mlps, spec, seed=3)
    assert all(torch.equal(p[g], q[g]) for p, q in zip(a, b) for g in p)


def test_bad_align_arguments(mlps, digits_split):
    _, x, _ = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    with pytest.raises(ef.EdgefuseError, match="unknown alignment method"):
        ef.align(mlps, spec, method="magic")
    with pytest.raises(ef.EdgefuseError, match="at least 2"):
        ef.align(mlps[:1], spec, data=data.batches(x))
