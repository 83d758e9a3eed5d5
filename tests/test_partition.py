"""Zoos of different data: disjoint shards of the training split per member (IID, Dirichlet label skew, K classes
each), reproducible, and named in the cache folder and the report."""
import pytest
import torch

import edgefuse as ef
from edgefuse.models import zoo
from edgefuse.models.partition import Partition, parse_partition

Y = torch.arange(1000) % 10


@pytest.mark.parametrize("text", ["iid", "dirichlet:0.5", "dirichlet:100", "classes:3"])
def test_shards_are_disjoint_reproducible_and_cover_what_they_take(text):
    p = parse_partition(text)
    shards = p.shards(Y, 4)
    taken = torch.cat(shards)
    assert len(shards) == 4 and all(len(s) for s in shards)
    assert len(taken.unique()) == len(taken)  # disjoint
    assert len(taken) == len(Y)  # every sample goes to some member
    assert all(torch.equal(a, b) for a, b in zip(shards, p.shards(Y, 4)))  # same split every run


def test_skew_grows_as_the_concentration_falls():
    def spread(a: float) -> float:  # the mean over members of their largest class share
        shards = Partition("dirichlet", a).shards(Y, 4)
        return float(torch.stack([torch.bincount(Y[s], minlength=10).max() / len(s) for s in shards]).mean())
    assert spread(0.1) > spread(1.0) > spread(1000.0) and spread(1000.0) < 0.15


def test_k_classes_per_member():
    shards = Partition("classes", 2).shards(Y, 5)
    assert [sorted(set(Y[s].tolist())) for s in shards] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_iid_shards_split_evenly_and_all_keeps_everything():
    assert [len(s) for s in Partition("iid").shards(Y, 3)] == [334, 333, 333]
    assert all(len(s) == len(Y) for s in Partition().shards(Y, 3))


@pytest.mark.parametrize("text", ["dirichlet:0", "dirichlet:x", "classes:0", "shards", "iid:2", ""])
def test_a_bad_partition_is_one_line(text):
    with pytest.raises(ef.EdgefuseError, match="unknown partition"):
        parse_partition(text)


def test_members_trained_on_other_shards_live_in_another_folder(tmp_path):
    root = tmp_path
    assert zoo.cache_dir(root, "cnn", 16, 2) != zoo.cache_dir(root, "cnn", 16, 2, Partition("iid"), 4)
    assert zoo.cache_dir(root, "cnn", 16, 2, Partition("iid"), 4) != zoo.cache_dir(root, "cnn", 16, 2,
                                                                                     Partition("iid"), 8)
    assert zoo.cache_dir(root, "cnn", 16, 2, Partition("dirichlet", 0.5), 4).name.endswith("-dir0.5-n4")
    assert zoo.cache_dir(root, "cnn", 16, 2, Partition("iid", seed=1), 4).name.endswith("-iid-n4-zs1")
    assert zoo.cache_dir(root, "cnn", 16, 2, Partition(seed=0)) == zoo.cache_dir(root, "cnn", 16, 2)


def test_another_zoo_seed_draws_other_shards():
    first, other = Partition("dirichlet", 0.5).shards(Y, 4), Partition("dirichlet", 0.5, seed=1).shards(Y, 4)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert sorted(torch.cat(other).tolist()) == list(range(len(Y)))  # still every index once


@pytest.mark.skipif(not zoo.Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_train_on_class_shards_from_the_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from edgefuse.cli import cli
    from edgefuse.models.data import load_dataset

    res = CliRunner().invoke(cli, ["-q", "train", "--arch", "mlp", "--width", "8", "--epochs", "1", "-n", "2",
                                   "--partition", "classes:5", "--cache", str(tmp_path)])
    assert res.exit_code == 0, res.output
    folder = zoo.cache_dir(tmp_path, "mlp", 8, 1, Partition("classes", 5), 2)
    assert json.loads((folder / "zoo.json").read_text())["partition"] == "disjoint shards of 5 classes per member"
    models, _ = zoo.zoo_models("mlp", 2, width=8, epochs=1, cache=tmp_path, train=False,
                               partition=Partition("classes", 5))
    x = load_dataset("fashion-mnist").x_test[:2000]
    with torch.no_grad():
        low = [float((m(x).argmax(1) < 5).float().mean()) for m in models]
    assert low[0] > 0.98 and low[1] < 0.02  # each predicts (almost) only the classes it saw
