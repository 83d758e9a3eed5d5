"""Cascades: the rule (stage 1 where confident, the combined ensemble elsewhere) against a reference computed from
every member's logits, through onnxruntime at batch 1 and in batches; the cap; the chooser with budgets that bind
the mean or the p99; bad cascade descriptions as one-line errors."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import edgefuse as ef
from edgefuse.base.cascade import GATES, CascadeError, CascadeRule, combine
from edgefuse.fuse import ensemble
from edgefuse.graph.onnx import export_onnx, parity, parity_inputs
from edgefuse.graph.cascade import cascade_graph
from edgefuse.base.cascade import DESCRIPTION
from edgefuse.base.files import file_digest
from edgefuse.measure.cascade import Cascade, calls_escalated, predict_cascade
from edgefuse.measure.runners import OrtRunner, stream_latency
from edgefuse.models import data
from edgefuse.run.baselines import choose_combine
from edgefuse.run.cascade import cascades
from edgefuse.run.choose import Budget, choose
from edgefuse.targets import load_target

from .test_choose import ENS, row


@pytest.fixture(scope="module")
def stages(cnns, tmp_path_factory):
    """Member 0's graph, and members 1-3 as one batched graph with head outputs; every member's logits."""
    folder = tmp_path_factory.mktemp("cascade")
    s = data.load_dataset("digits")
    first = export_onnx(cnns[0], s.example, folder / "stage1.onnx")
    rest = export_onnx(ensemble(cnns[1:], head_outputs=True).batch_heads(), s.example, folder / "stage2.onnx")
    with torch.no_grad():
        logits = np.stack([m.eval()(s.x_test).numpy() for m in cnns])
    return folder, first, rest, s.x_test.numpy(), logits


def reference(rule: CascadeRule, logits: np.ndarray) -> np.ndarray:
    """Stage 1's logits where its gate score clears the threshold, the combined members' elsewhere."""
    confident = GATES[rule.gate](logits[rule.first]) >= rule.threshold
    full = combine(logits[list(rule.members)].astype(np.float64), rule.combine)
    return np.where(confident[:, None], logits[rule.first], full)


@pytest.mark.parametrize("how", ["mean", "probs"])
def test_the_cascade_equals_its_reference_on_every_input(stages, how):
    folder, first, rest, x, logits = stages
    threshold = float(np.quantile(GATES["max_softmax"](logits[0]), 0.3))
    rule = CascadeRule(0, (1, 2, 3), "max_softmax", threshold, how)
    want = reference(rule, logits)
    cascade = Cascade(rule, first, rest)
    got, mask = predict_cascade(cascade, x, batch_size=64)
    assert 0.2 < mask.mean() < 0.4
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    one = np.concatenate([cascade(x[i:i + 1]) for i in range(50)])  # batch 1: each input decides alone
    np.testing.assert_allclose(one, want[:50], atol=2e-4, rtol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_a_cap_escalates_only_the_least_confident(stages):
    _, first, rest, x, logits = stages
    score = GATES["margin"](logits[0][:32])
    rule = CascadeRule(0, (1, 2, 3), "margin", 1.0, "mean", cap=3)  # everything below 1.0 asks to escalate
    cascade = Cascade(rule, first, rest)
    cascade(x[:32])
    assert cascade.last_escalated.sum() == 3
    assert set(np.flatnonzero(cascade.last_escalated)) == set(np.argsort(score)[:3])


@pytest.mark.parametrize("gate, how, opset", [("max_softmax", "mean", 18), ("margin", "probs", 18),
                                               ("margin", "mean", 17)])
def test_the_one_graph_cascade_equals_its_reference(stages, tmp_path, gate, how, opset, cnns):
    folder, first, rest, x, logits = stages
    threshold = float(np.quantile(GATES[gate](logits[0]), 0.25))
    rule = CascadeRule(0, (1, 2, 3), gate, threshold, how)
    if opset != 18:
        s = data.load_dataset("digits")
        first = export_onnx(cnns[0], s.example, tmp_path / "s1.onnx", opset=opset)
        rest = export_onnx(ensemble(cnns[1:], head_outputs=True).batch_heads(), s.example, tmp_path / "s2.onnx",
                           opset=opset)
    runner = OrtRunner(cascade_graph(rule, first, rest, tmp_path / "cascade.onnx"))
    want = reference(rule, logits)
    got = np.concatenate([runner(x[i:i + 32]) for i in range(0, len(x), 32)])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    one = np.concatenate([runner(x[i:i + 1]) for i in range(40)])
    np.testing.assert_allclose(one, want[:40], atol=2e-4, rtol=1e-4)


def test_a_cascade_to_one_member_runs_its_own_graph(stages, tmp_path, cnns):
    _, first, _, x, logits = stages
    s = data.load_dataset("digits")
    single = export_onnx(cnns[2], s.example, tmp_path / "m2.onnx")
    rule = CascadeRule(0, (2,), "max_softmax", 0.95, "probs")
    runner = OrtRunner(cascade_graph(rule, first, single, tmp_path / "cascade.onnx"))
    np.testing.assert_allclose(runner(x[:64]), reference(rule, logits[:, :64]), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(Cascade(rule, first, single)(x[:64]), reference(rule, logits[:, :64]), atol=2e-4,
                               rtol=1e-4)


def test_a_cascade_costs_what_it_escalates(stages, tmp_path):
    _, first, rest, x, logits = stages
    never = OrtRunner(cascade_graph(CascadeRule(0, (1, 2, 3), "max_softmax", 0.0, "mean"), first, rest,
                                    tmp_path / "never.onnx"))
    always = OrtRunner(cascade_graph(CascadeRule(0, (1, 2, 3), "max_softmax", 1.0, "mean"), first, rest,
                                     tmp_path / "always.onnx"))
    lat_never, lat_always = (stream_latency(r, x, 1, min_inputs=300) for r in (never, always))
    assert lat_never["runs"] >= 2 * 300 and lat_never["expected"] < lat_always["expected"]
    mask = np.zeros(64, bool)
    mask[[3, 40]] = True
    assert calls_escalated(mask, 1) == 2 / 64 and calls_escalated(mask, 32) == 1.0 and calls_escalated(mask, 16) == 0.5


def test_cascade_rows_from_the_best_member(cnns, tmp_path):
    s = data.load_dataset("digits")
    target = load_target("cpu-ort")
    from edgefuse.run.points import export_and_measure

    members = [export_and_measure(m, s, tmp_path / f"member{i}.onnx", target, key=f"member{i}", label=f"m{i}",
                                  kind="member") for i, m in enumerate(cnns)]
    reference_predictions = members[0].test_predictions
    rows, refs = cascades(members, cnns, [(0, 1)], s, target, tmp_path, reference_predictions)
    first = max(range(4), key=lambda i: (members[i].accuracy, -members[i].validation["nll"]))
    assert rows and all(r.kind == "cascade" and r.cascade["first"] == first for r in rows)
    for r in rows:
        c = r.cascade
        assert set(c["rest"]) | {first} == set(r.members) and r.combine == c["combine"]
        assert members[first].macs <= r.macs <= c["macs_worst"]
        assert abs(r.macs - members[first].macs - c["escalated"]["validation"] * (c["macs_worst"] -
                                                                                   members[first].macs)) <= 1
        assert set(r.latency_by_batch) == {"1", "32"} and all("mean" in v for v in r.latency_by_batch.values())
        assert parity(r.file, refs[r.key], parity_inputs(s.example, (1, 3, 64))) < 1e-4
    rates = sorted(r.cascade["escalated"]["validation"] for r in rows if len(r.members) == 4)
    assert rates == sorted(set(rates)) and rates[-1] <= 0.4


def test_the_combine_rule_is_chosen_on_validation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    good = np.eye(3)[y] * 2.0 + rng.normal(0, 0.5, (400, 3))
    loud = np.eye(3)[(y + 1) % 3] * 40.0  # one member, confidently wrong, with huge logits
    stack = np.stack([good, good + rng.normal(0, 0.5, (400, 3)), loud])
    assert choose_combine(stack, y) == "probs"  # its logits swamp the mean; its probabilities cannot
    assert choose_combine(stack[:2], y) in ("mean", "probs")


def cascade_row(key, acc, mean1, p99_1, macs=34, worst=100, seed=5):
    r = row(key, "cascade", acc, macs, mean1, 8.0, seed=seed)
    lat = {"1": {"p50": mean1 * 0.8, "expected": mean1, "p99": p99_1}, "32": {"p50": 8.0, "expected": 8.0,
                                                                              "p99": 9.0}}
    from dataclasses import replace
    return replace(r, latency_by_batch=lat, cascade={"macs_worst": worst})


def with_stats(r, p99_scale=1.05):
    from dataclasses import replace
    lat = {b: v | {"expected": v["p50"], "p99": v["p50"] * p99_scale} for b, v in r.latency_by_batch.items()}
    return replace(r, latency_by_batch=lat)


def test_a_p99_budget_below_the_full_path_never_ships_an_uncapped_cascade():
    member = with_stats(row("member0", "member", 0.88, 25, 0.25, 8.0, seed=2))
    ens = with_stats(ENS)
    cascade = cascade_row("cascade", 0.95, 0.35, 1.3)  # mean far below the ensemble, p99 = the full path
    rows = [member, ens, cascade]
    by_mean = choose(rows, Budget(max_macs_ratio=0.5, latency_ms={"1": 0.5}), ens)
    assert by_mean.chosen.key == "cascade"
    by_p99 = choose(rows, Budget(max_macs_ratio=0.5, latency_ms={"1": 0.5}, binds="p99"), ens)
    assert by_p99.chosen.key == "member0"
    by_worst_macs = choose(rows, Budget(max_macs_ratio=0.5, binds="p99"), ens)  # no latency budget: MACs bind
    assert by_worst_macs.chosen.key == "member0" and "cascade" not in by_worst_macs.within_budget


def exported(stages, tmp_path):
    folder, first, rest, _, _ = stages
    out = tmp_path / "cascade"
    out.mkdir()
    shutil.copy(first, out / "stage1.onnx")
    shutil.copy(rest, out / "stage2.onnx")
    rule = CascadeRule(0, (1, 2, 3), "max_softmax", 0.9, "mean")
    desc = {"rule": rule.to_json(), "stages": [
        {"file": f"stage{i}.onnx", "members": m, "sha256": file_digest(out / f"stage{i}.onnx")}
        for i, m in ((1, [0]), (2, [1, 2, 3]))]}
    (out / DESCRIPTION).write_text(json.dumps(desc))
    return out, desc


def test_an_exported_cascade_loads_and_runs(stages, tmp_path):
    out, _ = exported(stages, tmp_path)
    _, _, _, x, logits = stages
    cascade = ef.Cascade.load(out)
    np.testing.assert_allclose(cascade(x[:40]), reference(cascade.rule, logits[:, :40]), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("damage, says", [
    (lambda d, out: d["rule"].update(threshold=math.nan), "NaN"),
    (lambda d, out: d["rule"].update(threshold=1.5), "threshold"),
    (lambda d, out: d["rule"].update(rest=[0, 1]), "second stage"),
    (lambda d, out: d["rule"].update(gate="entropy"), "unknown gate"),
    (lambda d, out: (out / "stage2.onnx").unlink(), "missing"),
    (lambda d, out: d["stages"].reverse(), "stages swapped"),
    (lambda d, out: shutil.copy(out / "stage1.onnx", out / "stage2.onnx"), "digest"),
    (lambda d, out: d.pop("rule"), "cascade description"),
])
def test_a_bad_cascade_description_is_one_line(stages, tmp_path, damage, says):
    out, desc = exported(stages, tmp_path)
    damage(desc, out)
    (out / DESCRIPTION).write_text(json.dumps(desc, allow_nan=True))
    with pytest.raises(CascadeError) as e:
        ef.Cascade.load(out)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", [None, "nan", "swap"])
def test_verify_runs_a_cascade_folder_or_refuses_it_in_one_line(stages, tmp_path, damage):
    from click.testing import CliRunner

    from edgefuse.cli import cli

    out, desc = exported(stages, tmp_path)
    if damage == "nan":
        desc["rule"]["threshold"] = math.nan
        (out / DESCRIPTION).write_text(json.dumps(desc, allow_nan=True))
    elif damage == "swap":
        first = (out / "stage1.onnx").read_bytes()
        (out / "stage1.onnx").write_bytes((out / "stage2.onnx").read_bytes())
        (out / "stage2.onnx").write_bytes(first)
    res = CliRunner().invoke(cli, ["-q", "verify", str(out), "--dataset", "digits", "--batch", "1", "--batch", "8"])
    if damage is None:
        assert res.exit_code == 0, res.output
        result = json.loads(res.output)
        assert 0 < result["escalated"] < 1 and result["accuracy"] > 0.8 and set(result["latency_ms"]) == {"1", "8"}
    else:
        assert res.exit_code != 0 and res.exception is None or isinstance(res.exception, SystemExit)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and ("NaN" in lines[0] if damage == "nan" else "digest" in lines[0]), res.output
