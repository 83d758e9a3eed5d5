"""Sub-ensembles: greedy forward selection on validation, nested subsets, and a batched graph that computes exactly
the mean of its members' logits."""
import torch

from edgefuse.fuse import ensemble
from edgefuse.models import data
from edgefuse.run.baselines import select_members

from . import nets


def splits_of_digits():
    return data.load_dataset("digits")


def select(members, s):
    with torch.no_grad():
        logits = torch.stack([m.eval()(s.x_val) for m in members]).numpy()
    return select_members(logits, s.y_val)


def test_selection_is_nested_and_leaves_out_a_poor_member(cnns):
    s = splits_of_digits()
    torch.manual_seed(123)
    poor = nets.digits_cnn().eval()  # untrained: adding it can only hurt
    members = [*cnns, poor]
    subsets = select(members, s)
    assert [len(x) for x in subsets] == [2, 3, 4]
    assert all(set(a) < set(b) for a, b in zip(subsets, subsets[1:]))
    assert 4 not in subsets[-1]


def test_selection_starts_from_the_most_accurate_member(cnns):
    s = splits_of_digits()
    acc = [float((m.eval()(s.x_val).argmax(1) == s.y_val).float().mean()) for m in cnns]
    first = select(cnns, s)[0]
    assert max(range(len(cnns)), key=lambda i: acc[i]) in first


def test_a_batched_sub_ensemble_is_the_mean_of_its_members(cnns):
    x = splits_of_digits().x_test[:16]
    subset = (0, 2)
    module = ensemble([cnns[i] for i in subset], head_outputs=True).batch_heads().eval()
    with torch.no_grad():
        logits, heads = module(x)
        expected = torch.stack([cnns[i].eval()(x) for i in subset], 1)
    assert heads.shape == (16, 2, 10)
    torch.testing.assert_close(heads, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected.mean(1), atol=1e-5, rtol=1e-5)
