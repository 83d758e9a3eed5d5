"""Uncertainty from the heads: mutual information, the flagging rule chosen on validation, per-head distillation,
the chooser's AUROC criterion, and head outputs measured from the exported graph."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

import edgefuse as ef
from edgefuse.run.candidate import Candidate
from edgefuse.run.candidate import measure
from edgefuse.run.choose import Budget, choose, target_budget
from edgefuse.models.data import Splits
from edgefuse.fuse import DistillConfig, distill
from edgefuse.measure.metrics import mutual_information, scores
from edgefuse.targets import parse_target
from edgefuse.measure.uncertainty import flag_rule, youden_threshold


def test_mutual_information_is_zero_for_agreeing_heads_and_log2_for_two_sure_opposites():
    same = np.tile(np.array([[2.0, 0.5, -1.0]]), (4, 1))[None]  # one input, four identical heads
    assert mutual_information(same)[0] == pytest.approx(0.0, abs=1e-12)
    opposite = np.array([[[50.0, 0.0], [0.0, 50.0]]])  # each head sure of a different class
    assert mutual_information(opposite)[0] == pytest.approx(np.log(2), abs=1e-9)
    mixed = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # unsure and disagreeing: between the two
    assert 0 < mutual_information(mixed)[0] < np.log(2)


def test_heads_auroc_ranks_disagreement_and_is_none_without_heads():
    labels = torch.tensor([0, 0, 1, 1])
    logits = np.array([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])  # input 2 wrong
    agree, disagree = [[3.0, 0.0]] * 2, [[6.0, 0.0], [0.0, 6.0]]
    heads = np.array([agree, agree, disagree, agree])  # the heads disagree on the wrong answer only
    s = scores(logits, labels, head_logits=heads)
    assert s["heads_auroc"] == 1.0
    assert s["auroc"] == 0.5  # every max softmax is the same: no help
    assert scores(logits, labels)["heads_auroc"] is None


def test_youden_threshold_flags_exactly_the_low_trust_errors():
    trust = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    correct = np.array([False, False, True, True, True, True])
    t = youden_threshold(trust, correct)
    assert 0.2 < t <= 0.3 and ((trust < t) == ~correct).all()


def test_flag_rule_takes_the_better_signal_on_validation_and_reports_test():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    wrong = rng.random(n) < 0.2
    pred = np.where(wrong, 1 - y, y)
    logits = np.zeros((n, 2))
    logits[np.arange(n), pred] = 2.0  # the same max softmax everywhere: it tells nothing
    heads = np.repeat(logits[:, None], 3, 1)
    heads[wrong, 0] = heads[wrong, 0, ::-1]  # one head disagrees exactly where the answer is wrong
    rule = flag_rule((logits, heads), y, (logits, heads), y)
    assert rule["signal"] == "mutual_information" and rule["flag_when"] == "above"
    assert rule["validation_auroc"] == 1.0
    assert rule["test"]["errors_flagged"] == 1.0 and rule["test"]["kept_accuracy"] == 1.0
    assert rule["test"]["flagged"] == pytest.approx(wrong.mean())
    plain = flag_rule((logits, None), y, (logits, None), y)
    assert plain["signal"] == "max_softmax"
    assert flag_rule((logits, heads), pred, (logits, heads), pred) is None  # nothing wrong: nothing to tell apart


def _row(key, acc, macs, auroc, heads_auroc=None):
    val = np.zeros(1000, bool)
    val[:int(acc * 1000)] = True
    return Candidate(key=key, label=key, kind="fused" if heads_auroc else "member",
                     validation={"accuracy": acc, "nll": 0.3, "ece": 0.01, "auroc": auroc, "heads_auroc": heads_auroc},
                     test={"accuracy": acc}, macs=macs, params=macs,
                     latency_by_batch={"1": {"p50": macs / 100}}, runtime="test", val_correct=val)


def test_the_chooser_uncertainty_criterion_on_constructed_rows():
    ens = _row("ensemble", 0.92, 100, 0.88, 0.90)
    member = _row("member0", 0.95, 25, 0.80)  # most accurate, but its max softmax flags errors poorly
    fused = _row("depth4", 0.90, 30, 0.82, 0.87)  # its heads' disagreement does better
    rows = [member, ens, fused]
    assert choose(rows, Budget(max_macs_ratio=0.5), ens).chosen.key == "member0"
    picked = choose(rows, Budget(max_macs_ratio=0.5, min_auroc=0.85), ens)
    assert picked.chosen.key == "depth4" and "AUROC ≥ 0.85" in picked.reason
    with pytest.raises(ef.EdgefuseError, match="no candidate meets"):
        choose(rows, Budget(max_macs_ratio=0.5, min_auroc=0.95), ens)
    tgt = parse_target("t", 'runtime = "onnxruntime"\ndevice = "cpu"\nmin_auroc = 0.85\n')
    assert target_budget(tgt).min_auroc == 0.85 and target_budget(tgt, min_auroc=0.7).min_auroc == 0.7
    with pytest.raises(ef.EdgefuseError, match="min_auroc"):
        parse_target("t", 'runtime = "onnxruntime"\ndevice = "cpu"\nmin_auroc = 1.5\n')


def _states(modules):
    return [copy.deepcopy(m.state_dict()) for m in modules]


def test_per_head_distillation_changes_only_the_student_and_pulls_each_head_to_its_member(cnns, digits_split):
    calib, x, _ = digits_split
    spec = ef.permutation_spec(cnns[0], x[:2])
    aligned = ef.align(cnns, spec)
    before = _states(aligned)
    teacher = ef.ensemble(aligned, batched=True, head_outputs=True)
    teacher_before = _states([teacher])[0]
    start = ef.fuse(aligned, spec, depth=2, data=[calib[:200]], head_outputs=True, repair="bn")  # heads far apart
    cfg = DistillConfig(steps=40, batch_size=64)
    plain = distill(copy.deepcopy(start), teacher, calib, cfg, quiet=True)
    per_head = distill(copy.deepcopy(start), teacher, calib, replace(cfg, per_head=True), quiet=True)
    assert all(all(torch.equal(v, s[k]) for k, v in m.state_dict().items()) for m, s in zip(aligned, before))
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(v, per_head.state_dict()[k]) for k, v in start.state_dict().items())

    def head_gap(model):  # mean KL of each head from its own member
        with torch.no_grad():
            heads, members = model(x)[1], teacher(x)[1]
        return torch.nn.functional.kl_div(torch.log_softmax(heads, -1).flatten(0, 1),
                                          torch.log_softmax(members, -1).flatten(0, 1), log_target=True,
                                          reduction="batchmean").item()
    assert head_gap(per_head) < head_gap(plain)


def test_measured_rows_read_the_heads_from_the_exported_graph(cnns, digits_split, tmp_path):
    calib, x, y = digits_split
    splits = Splits("digits", calib, torch.zeros(len(calib), dtype=torch.long), x[:300], y[:300], x[300:], y[300:])
    spec = ef.permutation_spec(cnns[0], x[:2])
    fused = ef.fuse(ef.align(cnns, spec), spec, depth=2, data=[calib[:200]], batch_heads=True, head_outputs=True)
    path = ef.export_onnx(fused, x[:2], tmp_path / "m.onnx")
    row = measure(fused, splits, path, key="d2", label="d2", kind="fused")
    with torch.no_grad():
        logits, heads = (t.numpy() for t in fused(x[300:]))
    expected = scores(logits, y[300:], head_logits=heads)
    assert row.test["heads_auroc"] == pytest.approx(expected["heads_auroc"], abs=1e-3)
    assert row.uncertainty["validation_auroc"] == max(row.validation["auroc"], row.validation["heads_auroc"])
    assert row.uncertainty_auroc == row.uncertainty["validation_auroc"]
