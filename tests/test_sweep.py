"""The sweep: choice within a budget, clear refusals, resume, and the plot."""
import json

import pytest
from click.testing import CliRunner

import edgefuse as ef
from edgefuse.cli import cli
from edgefuse.sweep import choose


def _row(label, acc, macs, p50, mem, **extra):
    return {"label": label, "accuracy": acc, "macs": macs, "peak_memory_mb": mem,
            "latency_by_batch": {"1": {"p50": p50}}} | extra


EXACT = {"ensemble": _row("ensemble", 0.92, 100, 1.0, 40.0, file="e.onnx"),
         "ensemble_batched": _row("ensemble_batched", 0.92, 100, 0.8, 38.0, file="b.onnx"),
         "ensemble_sessions": _row("ensemble_sessions", 0.92, 100, 1.2, 60.0)}
CANDS = [_row("depth 1", 0.91, 90, 0.85, 35.0), _row("depth 2", 0.89, 60, 0.6, 25.0),
         _row("alpha 0.5", 0.90, 70, 0.7, 28.0), _row("depth 3", 0.85, 40, 0.4, 20.0),
         _row("depth 4", 0.80, 25, 0.3, 15.0)]


def test_most_accurate_within_latency_and_memory():
    assert choose(CANDS, EXACT, latency_ms=0.75)["label"] == "alpha 0.5"
    assert choose(CANDS, EXACT, latency_ms=0.75, memory_mb=26)["label"] == "depth 2"
    assert choose(CANDS, EXACT, latency_ms=5.0)["label"] == "ensemble_batched"  # the exact one fits: it dominates


def test_slower_than_an_exact_ensemble_is_never_chosen():
    # depth 1 (0.85 ms) is slower than the batched ensemble (0.8 ms) although it fits a 0.9 ms budget and 36 MB.
    assert choose(CANDS, EXACT, latency_ms=0.9, memory_mb=36)["label"] == "alpha 0.5"


def test_fastest_within_an_accuracy_drop():
    assert choose(CANDS, EXACT, max_drop=0.03)["label"] == "depth 2"


def test_impossible_budget_names_the_cheapest():
    with pytest.raises(ef.EdgefuseError, match=r"no candidate meets the budget \(p50 ≤ 0.1 ms\); the cheapest is "
                                               r"depth 4: p50 0.300 ms"):
        choose(CANDS, EXACT, latency_ms=0.1)


@pytest.fixture
def checkpoints(mlp_checkpoints):
    return mlp_checkpoints


def test_sweep_runs_in_workers_resumes_and_plots(checkpoints, tmp_path):
    args = ["-q", "sweep", "--model", "tests.nets:digits_mlp", *checkpoints, "--dataset", "digits",
            "--alpha", "0.5", "--workers", "2", "--latency-ms", "10", "--out-root", str(tmp_path)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "cpu-ort" / "sweep"
    sweep = json.loads((out / "sweep.json").read_text())
    labels = [c["label"] for c in sweep["candidates"]]
    assert labels == ["ensemble", "depth 1", "depth 2", "alpha 0.5"]
    assert all(c["peak_memory_mb"] >= 0 for c in sweep["candidates"])  # tiny nets may not raise the peak
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert len(stamps) == 3
    res = CliRunner().invoke(cli, args)  # resumed: no point is recomputed
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == stamps
    again = json.loads((out / "sweep.json").read_text())
    assert again["candidates"][1:] == sweep["candidates"][1:]  # the stored points, exactly as measured


def test_sweep_budget_nobody_meets(checkpoints, tmp_path):
    res = CliRunner().invoke(cli, ["-q", "sweep", "--model", "tests.nets:digits_mlp", *checkpoints, "--dataset",
                                   "digits", "--alpha", "0.5", "--workers", "0", "--latency-ms", "0.00001",
                                   "--out-root", str(tmp_path)])
    assert res.exit_code == 1 and "no candidate meets the budget" in res.output and "the cheapest is" in res.output


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None,
                    reason="Ray is not installed (optional extra edgefuse[ray])")
def test_sweep_on_a_local_ray_instance(checkpoints, tmp_path):
    res = CliRunner().invoke(cli, ["-q", "sweep", "--model", "tests.nets:digits_mlp", *checkpoints, "--dataset",
                                   "digits", "--alpha", "0.5", "--ray", "local", "--out-root", str(tmp_path)])
    assert res.exit_code == 0, res.output


def test_verify_from_python(mlps, digits_split, tmp_path):
    calib, x, y = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    fused = ef.fuse(ef.align(mlps, spec), spec, alpha=0.5, data=[calib])
    report = ef.verify(fused, mlps, (x, y), out_dir=tmp_path)
    for key in ("single", "ensemble", "ensemble_batched", "ensemble_sessions", "fused"):
        assert {"accuracy", "nll", "ece", "macs", "params", "latency_ms"} <= set(report[key])
    assert report["ensemble_batched"]["accuracy"] == report["ensemble"]["accuracy"]
    assert report["fused"]["macs"] < report["ensemble"]["macs"]
    assert json.loads((tmp_path / "report.json").read_text())["fused"]["accuracy"] == report["fused"]["accuracy"]
    with pytest.raises(ef.EdgefuseError, match="labelled data"):
        ef.verify(fused, mlps, [x])
