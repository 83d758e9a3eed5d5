"""benchmarks/zipit.py's ZipIt!-style merge: zipping a model with permuted copies of itself keeps its function at
every depth (the merge and unmerge matrices are right), and zipping across members only puts one feature of each
member in every merged feature."""
import copy
import sys
from pathlib import Path

import pytest
import torch

import edgefuse as ef
from edgefuse.models import zoo
from edgefuse.spec.permspec import permute_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks import each other by name
import zipit  # noqa: E402


@pytest.fixture(scope="module")
def copies():
    torch.manual_seed(0)
    model = zoo.cnn(width=4, image=12).eval()
    x = torch.rand(64, 1, 12, 12)
    spec = ef.permutation_spec(model, x[:2])
    others = []
    for seed in (1, 2):
        other = copy.deepcopy(model)
        other.load_state_dict(permute_state(model.state_dict(), spec, spec.random_perms(seed)))
        others.append(other)
    return [model, others[0], copy.deepcopy(model), others[1]], [x[:32], x[32:]]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_zipping_permuted_copies_keeps_the_function(copies, depth):
    models, xs = copies
    covs = zipit.feature_covariances(models, xs, zipit.weight_layers(models[0]))
    fused, merges = zipit.zip_models(models, depth, False, covs)
    assert len(merges) == depth and all(m.shape == (m.shape[0], 4 * m.shape[0]) for m in merges)
    x = torch.rand(16, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), models[0](x), atol=1e-4, rtol=1e-4)


def test_each_merged_feature_averages_one_feature_of_each_model_across_members(copies):
    models, xs = copies
    covs = zipit.feature_covariances(models, xs, zipit.weight_layers(models[0]))
    merge = zipit.zip_features(covs[0], 4, within=False)
    owners = (merge > 0).reshape(len(merge), 4, -1).sum(2)
    assert bool((owners == 1).all())
    torch.testing.assert_close(merge.sum(1), torch.ones(len(merge), dtype=merge.dtype))
