"""The one chooser on constructed rows: budgets at every batch size, dominance, members that win, ties within noise."""
from dataclasses import replace

import numpy as np
import pytest

import edgefuse as ef
from edgefuse.run.candidate import Candidate
from edgefuse.run.choose import Budget, choose, dominance, target_budget
from edgefuse.measure.metrics import paired_z
from edgefuse.targets import parse_target

N_VAL = 2000


def correct(acc: float, seed: int) -> np.ndarray:
    """Per-sample results with the given accuracy."""
    out = np.zeros(N_VAL, bool)
    out[np.random.default_rng(seed).choice(N_VAL, int(round(acc * N_VAL)), replace=False)] = True
    return out


def worse_by(base: np.ndarray, n: int) -> np.ndarray:
    """`base` with its first `n` right answers turned wrong: a paired difference of n samples."""
    out = base.copy()
    out[np.flatnonzero(out)[:n]] = False
    return out


def row(key, kind, acc, macs, p1, p32, mem=10.0, val=None, seed=0):
    val = correct(acc, seed) if val is None else val
    return Candidate(key=key, label=key, kind=kind, validation={"accuracy": float(val.mean()), "nll": 0.3, "ece": 0.01},
                     test={"accuracy": 0.5, "nll": 0.3, "ece": 0.01}, macs=macs, params=macs,
                     latency_by_batch={"1": {"p50": p1}, "32": {"p50": p32}}, runtime="test", peak_memory_mb=mem,
                     val_correct=val)


ENS = row("ensemble", "ensemble", 0.92, 100, 1.0, 30.0, 40.0, seed=1)
BATCHED = row("ensemble_batched", "ensemble", 0.92, 100, 0.8, 31.0, 45.0, val=ENS.val_correct)


def test_a_member_that_beats_every_fused_row_ships():
    rows = [row("member0", "member", 0.90, 25, 0.25, 8.0, seed=2), ENS, BATCHED,
            row("depth4", "fused", 0.85, 27, 0.30, 8.5, seed=3), row("alpha0.1", "fused", 0.80, 40, 0.45, 12.0, seed=4)]
    choice = choose(rows, Budget(max_macs_ratio=0.5), ENS)
    assert choice.chosen.key == "member0" and "member ships" in choice.reason
    assert choice.dominated_by["depth4"] == "member0" and choice.dominated_by["alpha0.1"] == "member0"


def test_a_dominated_fused_row_is_never_chosen():
    # depth2 is the most accurate fused row within the MACs share, but the batched ensemble is more accurate and
    # no slower at both batch sizes: shipping depth2 would hand the user a worse and slower model.
    rows = [row("member0", "member", 0.80, 25, 0.25, 8.0, seed=2), ENS, BATCHED,
            row("depth2", "fused", 0.89, 50, 0.9, 32.0, seed=5), row("depth3", "fused", 0.85, 40, 0.5, 15.0, seed=6)]
    beaten = dominance(rows, ["1", "32"])
    assert beaten["depth2"] == "ensemble_batched"
    assert choose(rows, Budget(max_macs_ratio=0.5), ENS).chosen.key == "depth3"


def test_a_fused_row_within_noise_of_a_distilled_member_as_fast_does_not_ship():
    # depth4 is right on 10 validation samples the distilled member gets wrong and wrong on 6 it gets right (a
    # lead of 4, 1 standard error) at about the same speed: fusion has not earned its place, the student ships.
    student = row("student", "distilled member", 0.88, 25, 0.25, 8.0, seed=2)
    lead = worse_by(student.val_correct, 6)
    lead[np.flatnonzero(~student.val_correct)[:10]] = True
    rows = [row("member0", "member", 0.86, 25, 0.25, 8.0, seed=3), student, ENS, BATCHED,
            row("depth4", "fused", 0.0, 27, 0.26, 8.2, val=lead)]
    choice = choose(rows, Budget(max_macs_ratio=0.5), ENS)
    assert choice.chosen.key == "student" and "fused model ships only where" in choice.reason


def test_a_fused_row_that_leads_beyond_noise_ships():
    student = row("student", "distilled member", 0.88, 25, 0.25, 8.0, seed=2)
    lead = student.val_correct.copy()
    lead[np.flatnonzero(~lead)[:60]] = True
    rows = [student, ENS, BATCHED, row("depth4", "fused", 0.0, 27, 0.26, 8.2, val=lead)]
    assert choose(rows, Budget(max_macs_ratio=0.5), ENS).chosen.key == "depth4"


@pytest.mark.parametrize("right,wrong,ships", [(60, 0, "merge"), (10, 6, "member0")])
def test_a_merge_ships_where_it_beats_every_member_beyond_noise_and_yields_on_a_tie(right, wrong, ships):
    """A merge of fine-tunes costs one member: beyond noise ahead of the best member (60 more right), it ships;
    within noise (right on 10 it misses, wrong on 6 it gets: 1 standard error), the member does — a merge, like a
    fused model, must earn its place."""
    member = row("member0", "member", 0.88, 25, 0.25, 8.0, seed=2)
    val = worse_by(member.val_correct, wrong)
    val[np.flatnonzero(~member.val_correct)[:right]] = True
    rows = [member, row("member1", "member", 0.87, 25, 0.25, 8.0, seed=3), ENS, BATCHED,
            row("merge", "merge", 0.0, 25, 0.25, 8.0, val=val)]
    choice = choose(rows, Budget(max_macs_ratio=0.5), ENS)
    assert choice.chosen.key == ships, choice.reason
    if ships == "member0":
        assert "a merge ships only where it beats every member" in choice.reason


def test_budgets_hold_at_every_batch_size():
    rows = [row("member0", "member", 0.80, 25, 0.25, 8.0, seed=2), ENS, BATCHED,
            row("depth3", "fused", 0.88, 40, 0.5, 15.0, seed=6),
            row("alpha", "fused", 0.86, 45, 0.55, 13.0, mem=12.0, seed=7)]
    assert choose(rows, Budget(latency_ms={"1": 0.6, "32": 20.0}), ENS).chosen.key == "depth3"
    # depth3 fits at batch 1 but not at batch 32 (15 ms > 14 ms): the next most accurate that fits both ships.
    assert choose(rows, Budget(latency_ms={"1": 0.6, "32": 14.0}), ENS).chosen.key == "alpha"
    assert choose(rows, Budget(latency_ms={"1": 0.6, "32": 14.0}, memory_mb=11.0), ENS).chosen.key == "member0"


@pytest.mark.parametrize("apart,ships", [(3, "depth4"), (8, "alpha0.5")])
def test_a_tie_within_noise_goes_to_the_clearly_faster(apart, ships):
    # 3 samples apart is 1.7 standard errors (a tie): the 3× faster depth 4 ships. 8 apart is 2.8: a real gap.
    slow = row("alpha0.5", "fused", 0, 80, 0.8, 25.0, val=correct(0.90, 8))
    fast = row("depth4", "fused", 0, 27, 0.3, 8.0, val=worse_by(slow.val_correct, apart))
    choice = choose([ENS, BATCHED, slow, fast], Budget(max_macs_ratio=0.9), ENS)
    assert choice.chosen.key == ships
    assert ("ties on validation" in choice.reason) == (ships == "depth4")
    assert ("a tie): alpha0.5" in choice.reason) == (ships == "depth4")


def test_a_tie_between_the_same_network_is_not_broken_by_timing_noise():
    # Two members (same MACs and parameters) within noise on validation, one measured 20 % faster: that is timing
    # noise between identical graphs, so the more accurate ships; a genuinely smaller network would still win it.
    best = row("member3", "member", 0, 25, 0.30, 8.0, val=correct(0.91, 9))
    twin = row("member0", "member", 0, 25, 0.24, 6.4, val=worse_by(best.val_correct, 3))
    choice = choose([ENS, BATCHED, best, twin], Budget(max_macs_ratio=0.5), ENS)
    assert choice.chosen.key == "member3" and "clearly faster" not in choice.reason
    assert "a tie): member0" in choice.reason
    smaller = row("member0", "member", 0, 20, 0.24, 6.4, val=twin.val_correct)
    assert choose([ENS, BATCHED, best, smaller], Budget(max_macs_ratio=0.5), ENS).chosen.key == "member0"
    int8 = replace(twin, key="member3-int8", label="member3-int8", precision="int8")
    assert choose([ENS, BATCHED, best, int8], Budget(max_macs_ratio=0.5), ENS).chosen.key == "member3-int8"


def test_max_drop_ships_the_fastest_close_enough():
    rows = [row("member0", "member", 0.85, 25, 0.25, 8.0, seed=2), ENS, BATCHED,
            row("depth3", "fused", 0.905, 40, 0.5, 15.0, seed=6)]
    assert choose(rows, Budget(max_drop=0.02), ENS).chosen.key == "depth3"
    assert choose(rows, Budget(max_drop=0.10), ENS).chosen.key == "member0"


def test_impossible_budget_names_the_cheapest():
    rows = [row("member0", "member", 0.85, 25, 0.25, 8.0, seed=2), ENS, BATCHED]
    with pytest.raises(ef.EdgefuseError, match=r"no candidate meets the budget \(mean latency ≤ 0.1 ms at batch 1\); "
                                               r"the cheapest is member0: mean 0.250 ms"):
        choose(rows, Budget(latency_ms={"1": 0.1}), ENS)


def test_identical_rows_keep_exactly_one():
    a = row("a", "member", 0.9, 25, 0.3, 8.0, seed=3)
    b = row("b", "member", 0.9, 25, 0.3, 8.0, val=a.val_correct)
    assert dominance([a, b], ["1", "32"]) == {"b": "a"}


def test_target_budget_applies_latency_at_every_batch_size():
    tgt = parse_target("t", 'runtime = "onnxruntime"\ndevice = "cpu"\nbatch_sizes = [1, 32]\nlatency_budget_ms = 2.5\n')
    assert target_budget(tgt).latency_ms == {"1": 2.5, "32": 2.5}
    assert target_budget(tgt, latency_ms=1.0).latency_ms == {"1": 1.0, "32": 1.0}
    assert target_budget(tgt, latency_ms=(0.2, 6.0)).latency_ms == {"1": 0.2, "32": 6.0}
    with pytest.raises(ef.EdgefuseError, match="3 latency budgets for the 2 batch sizes"):
        target_budget(tgt, latency_ms=(0.2, 6.0, 9.0))
    per_batch = parse_target("t", 'runtime = "onnxruntime"\ndevice = "cpu"\nbatch_sizes = [1, 32]\n'
                                  'latency_budget_ms = [0.5, 8.0]\n')
    assert target_budget(per_batch).latency_ms == {"1": 0.5, "32": 8.0}
    with pytest.raises(ef.EdgefuseError, match="has 1 values for 2 batch sizes"):
        parse_target("t", 'runtime = "onnxruntime"\ndevice = "cpu"\nbatch_sizes = [1, 32]\nlatency_budget_ms = [1.0]\n')


def test_paired_z_counts_only_disagreements():
    a = np.array([1, 1, 1, 1, 0, 0], bool)
    b = np.array([1, 1, 0, 0, 0, 1], bool)
    assert paired_z(a, b) == pytest.approx((2 - 1) / np.sqrt(3))
    assert paired_z(a, a) == 0.0


def test_misclassification_auroc_against_a_hand_computed_case():
    import torch

    from edgefuse.measure.metrics import misclassification_auroc, scores

    # right answers at confidence 0.9, 0.8, 0.4; wrong ones at 0.7 and 0.4: of the 6 (right, wrong) pairs the right
    # one is more confident in 4, tied in 1 (counts 1/2) and less confident in 1 -> (4 + 0.5) / 6
    conf, correct = np.array([0.9, 0.8, 0.4, 0.7, 0.4]), np.array([True, True, True, False, False])
    assert misclassification_auroc(conf, correct) == 4.5 / 6
    assert misclassification_auroc(conf, ~correct) == 1.5 / 6
    assert misclassification_auroc(conf, np.ones(5, dtype=bool)) is None
    logits = np.array([[5.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.0]])
    got = scores(logits, torch.tensor([0, 1, 1, 0]))  # the one mistake is the least confident but one: 2 of 3 pairs
    assert got["accuracy"] == 0.75 and got["auroc"] == 2 / 3


def test_the_device_frontier_keeps_what_nothing_cheaper_beats_and_thins_evenly():
    from edgefuse.run.choose import frontier

    rows = [row("m0", "member", 0.90, 25, 1, 1), row("m1", "member", 0.91, 25, 1, 1),
            row("pair", "sub-ensemble", 0.92, 50, 2, 2), row("d2", "fused", 0.89, 70, 2, 2),
            row("trio", "sub-ensemble", 0.93, 75, 3, 3), row("ens", "ensemble", 0.925, 100, 4, 4),
            replace(row("m1-int8", "member", 0.905, 25, 1, 1), precision="int8")]
    keys = [c.key for c in frontier(rows, 6)]
    assert keys == ["m1-int8", "m1", "pair", "trio"]  # INT8 is cheaper at equal MACs; d2, ens and m0 are beaten
    assert [c.key for c in frontier(rows, 3)] == ["m1-int8", "pair", "trio"]  # the cheapest and the best stay
    ties = [row("a", "member", 0.9, 25, 1, 1), row("b", "member", 0.9, 25, 1, 1)]
    assert [c.key for c in frontier(ties, 6)] == ["a"]  # of equals the first listed stands


def test_distillation_picks_the_most_accurate_repair_of_a_family_when_none_fits_the_budget():
    from edgefuse.run.candidate import Point
    from edgefuse.run.field import Field, distill_picks

    member = replace(row("member0", "member", 0.90, 25, 0.3, 8.0), point=Point("member", 0, repair=None))
    alphas = [replace(row(f"alpha{r}", "fused", acc, 57, 0.6, 17.0, seed=3), point=Point("alpha", 0.25, repair=r))
              for r, acc in ((None, 0.44), ("lsq", 0.86), ("bn", 0.42))]
    depth = replace(row("depth4", "fused", 0.87, 27, 0.3, 8.0), point=Point("depth", 4.0, repair="lsq"))
    picks = distill_picks(Field([member], {"ensemble": ENS}, alphas + [depth]), Budget(max_macs_ratio=0.3))
    assert [(p.kind, p.repair, p.distill) for p in picks] == [("member", None, True), ("depth", "lsq", True),
                                                              ("alpha", "lsq", True)]


def test_a_chain_of_ties_never_ships_a_model_beaten_beyond_noise():
    """best ~ a faster cascade (1.4 standard errors) ~ a member (1.7), but the member is 2.2 below the best: the
    cascade ships; with the member within noise of the best too, the member would."""
    best = row("cascade-best", "cascade", 0.92, 30, 0.30, 9.0, seed=7)
    cheap = row("cascade-cheap", "cascade", 0.0, 26, 0.20, 8.0, val=worse_by(best.val_correct, 2))
    member = row("member0", "member", 0.0, 25, 0.19, 7.9, val=worse_by(best.val_correct, 5))
    choice = choose([best, cheap, member, ENS, BATCHED], Budget(max_macs_ratio=0.5), ENS)
    assert choice.chosen.key == "cascade-cheap", choice.reason
    close = row("member0", "member", 0.0, 25, 0.19, 7.9, val=worse_by(best.val_correct, 3))
    choice = choose([best, cheap, close, ENS, BATCHED], Budget(max_macs_ratio=0.5), ENS)
    assert choice.chosen.key == "member0"  # the fastest of the candidates within noise of the best


def test_a_budget_whose_every_row_is_beaten_from_outside_names_the_winner():
    """Nothing within the MACs budget ships when a row outside it is more accurate and faster: the error says which."""
    rows = [row("member0", "member", 0.85, 25, 0.25, 8.0, seed=2), ENS,
            row("alpha0.5", "fused", 0.91, 80, 0.2, 7.0, seed=7)]
    with pytest.raises(ef.EdgefuseError, match=r"every candidate within the budget \(MACs ≤ 0.5× the ensemble\) is "
                                               r"beaten .* by one outside it: alpha0.5 \(validation accuracy 0.9100"):
        choose(rows, Budget(max_macs_ratio=0.5), ENS)
