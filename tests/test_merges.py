"""Merges of fine-tunes of one network: the registered merges' defining properties, the greedy soup, the regime a
run recognises (an export with --base end to end: tests/test_example.py, the fine-tune example)."""

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import edgefuse as ef
from edgefuse.cli import cli
from edgefuse.fuse.merges import MERGES, merge_states, merged_model
from edgefuse.models.data import load_dataset
from edgefuse.models.load import load_base
from edgefuse.measure.metrics import scores
from edgefuse.measure.runners import TorchRunner, predict
from edgefuse.run.merges import greedy_soup
from edgefuse.run.setup import identity_share, regime_of
from edgefuse.spec.permspec import permutation_spec

from .test_bad_input import CNN


def _states(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 5, generator=gen), "n": torch.tensor(7)} for _ in range(n)]


def test_every_merge_declares_a_default_among_its_values():
    for m in MERGES.values():
        assert m.settings()[0] == m.defaults() and all(v in m.grid[k] for k, v in m.defaults().items())


def test_the_soup_is_the_mean_and_task_arithmetic_at_scale_1_is_the_soup():
    states, base = _states(), {"w": torch.randn(4, 5)}
    soup = merge_states(states, None, "soup")
    assert torch.allclose(soup["w"], torch.stack([s["w"] for s in states]).mean(0)) and soup["n"] == 7
    ta = merge_states(states, base, "task-arithmetic", {"scale": 1.0})
    assert torch.allclose(ta["w"], soup["w"], atol=1e-6)
    assert torch.allclose(merge_states(states, base, "task-arithmetic", {"scale": 0.0})["w"], base["w"])


def test_ties_keeps_agreeing_task_vectors_and_drops_the_minority_sign():
    base = {"w": torch.zeros(1, 4)}
    tau = torch.tensor([[1.0, 2.0, -3.0, 0.1], [3.0, 2.0, 1.0, 0.1], [2.0, -8.0, 1.0, 0.1]])
    states = [{"w": t[None]} for t in tau]
    out = merge_states(states, base, "ties", {"density": 1.0, "scale": 1.0})["w"][0]
    # sign per weight by the sum: +, -, -, +; the mean of the entries of that sign
    assert torch.allclose(out, torch.tensor([2.0, -8.0, -3.0, 0.1]))


def test_a_merge_against_a_base_needs_one():
    with pytest.raises(ef.EdgefuseError, match="needs the base"):
        merge_states(_states(), None, "ties")


def test_fine_tunes_of_one_base_are_recognised_and_scratch_members_are_not(finetunes, cnns):
    x = load_dataset("digits").x_val[:64]
    shares = {}
    for name, models in (("fine-tunes", finetunes[1]), ("scratch", cnns)):
        spec = permutation_spec(models[0], x[:2])
        perms = ef.align_perms(models, spec, method="weight")
        shares[name] = identity_share(perms)
    assert shares["fine-tunes"] >= 0.9 > 0.5 > shares["scratch"], shares
    assert regime_of(None, {"weight": shares["fine-tunes"]}).name == "fine-tunes"
    assert regime_of(None, {"weight": shares["scratch"]}).name == "from scratch"


def test_the_greedy_soup_starts_from_the_best_member_and_keeps_what_helps(finetunes):
    splits = load_dataset("digits")
    kept = greedy_soup(finetunes[1], splits)
    best = max(range(4), key=lambda i: (scores(predict(TorchRunner(finetunes[1][i]), splits.x_val),
                                                  splits.y_val)["accuracy"]))
    assert best in kept and list(kept) == sorted(kept)


def test_a_merge_of_fine_tunes_keeps_most_of_their_accuracy_and_a_soup_of_scratch_members_does_not(finetunes, cnns):
    splits = load_dataset("digits")

    def acc(m):
        return scores(predict(TorchRunner(m), splits.x_test), splits.y_test)["accuracy"]
    soup = acc(merged_model(finetunes[1], None, "soup"))
    assert soup >= min(acc(m) for m in finetunes[1]) - 0.02
    assert acc(merged_model(cnns, None, "soup")) < min(acc(m) for m in cnns) - 0.2


def test_a_base_with_another_head_is_read_without_it_and_a_foreign_one_is_refused(finetunes, tmp_path):
    base = finetunes[0].state_dict()
    head = [k for k in base if k.endswith("weight")][-1]
    save_file({**base, head: torch.zeros(5, base[head].shape[1])}, tmp_path / "other-head.safetensors")
    read = load_base(CNN, tmp_path / "other-head.safetensors")
    assert head not in read and len(read) == len(base) - 1
    save_file({"x": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ef.EdgefuseError, match="shares 0 of the architecture's"):
        load_base(CNN, tmp_path / "foreign.safetensors")


def test_base_without_model_and_zoo_with_model_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["-q", "export", "--base", "b.safetensors"])
    assert res.exit_code == 1 and "give it with --model" in res.stderr
