"""The sweep: members, ensembles and fused points in workers, resume, clear refusals, the plot; ef.verify."""
import json

import pytest
from click.testing import CliRunner

import edgefuse as ef
from edgefuse.cli import cli
from edgefuse.run.config import RunConfig


@pytest.fixture
def checkpoints(mlp_checkpoints):
    return mlp_checkpoints


def test_sweep_runs_in_workers_resumes_and_plots(checkpoints, tmp_path):
    args = ["-q", "sweep", "--model", "tests.nets:digits_mlp", *checkpoints, "--dataset", "digits",
            "--alpha", "0.5", "--workers", "2", "--latency-ms", "10", "--distill-steps", "20",
            "--out-root", str(tmp_path)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / "cpu-ort" / "sweep"
    sweep = json.loads((out / "sweep.json").read_text())
    keys = [c["key"] for c in sweep["candidates"]]
    assert keys[:6] == ["member0", "member1", "member2", "ensemble", "ensemble_batched", "ensemble_sessions"]
    assert keys[6].startswith("sub-ensemble-") and sweep["candidates"][6]["kind"] == "sub-ensemble"
    method = RunConfig.methods[0]
    assert keys[7:10] == [f"{method}-depth1-lsq", f"{method}-depth2-lsq", f"{method}-alpha0.5-lsq"]
    assert {c["kind"] for c in sweep["candidates"][10:]} == {"distilled member", "fused"}
    assert all(c["peak_memory_mb"] >= 0 for c in sweep["candidates"])  # tiny nets may not raise the peak
    assert sweep["shipped"]["key"] in keys and sweep["candidates"][keys.index(sweep["shipped"]["key"])][
        "dominated_by"] is None
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert len(stamps) == len(keys) - 4  # every candidate but the exact ensembles and the sub-ensemble is stored
    res = CliRunner().invoke(cli, args)  # resumed: no point is recomputed
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == stamps
    again = json.loads((out / "sweep.json").read_text())
    def measured(rows: list[dict]) -> list[dict]:
        """Stored rows without `dominated_by`: the exact ensembles are timed afresh, so that verdict may change."""
        return [{k: v for k, v in c.items() if k != "dominated_by"} for c in rows
                if c["kind"] not in ("ensemble", "sub-ensemble")]

    assert measured(again["candidates"]) == measured(sweep["candidates"])  # exactly as measured


def test_sweep_budget_nobody_meets(checkpoints, tmp_path):
    res = CliRunner().invoke(cli, ["-q", "sweep", "--model", "tests.nets:digits_mlp", *checkpoints, "--dataset",
                                   "digits", "--alpha", "0.5", "--workers", "0", "--latency-ms", "0.00001",
                                   "--distill-steps", "0", "--out-root", str(tmp_path)])
    assert res.exit_code == 1 and "no candidate meets the budget" in res.output and "the cheapest is" in res.output


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None,
                    reason="Ray is not installed (optional extra edgefuse[ray])")
def test_sweep_on_a_local_ray_instance(checkpoints, tmp_path):
    res = CliRunner().invoke(cli, ["-q", "sweep", "--model", "tests.nets:digits_mlp", *checkpoints, "--dataset",
                                   "digits", "--alpha", "0.5", "--ray", "local", "--distill-steps", "0",
                                   "--out-root", str(tmp_path)])
    assert res.exit_code == 0, res.output


def test_verify_from_python(mlps, digits_split, tmp_path):
    calib, x, y = digits_split
    spec = ef.permutation_spec(mlps[0], x[:2])
    fused = ef.fuse(ef.align(mlps, spec), spec, alpha=0.5, data=[calib])
    report = ef.verify(fused, mlps, (x[200:], y[200:]), out_dir=tmp_path, validation=(x[:200], y[:200]))
    for key in ("single", "ensemble", "ensemble_batched", "ensemble_sessions", "fused", "given"):
        assert {"accuracy", "nll", "ece", "macs", "params", "latency_ms", "validation", "test"} <= set(report[key])
    assert report["n_validation"] == 200 and report["n_test"] == len(x) - 200
    assert "given validation data" in report["validation_data"]
    assert report["ensemble_batched"]["accuracy"] == report["ensemble"]["accuracy"]
    assert report["given"]["macs"] < report["ensemble"]["macs"]
    assert report["fused"]["dominated_by"] is None
    assert json.loads((tmp_path / "report.json").read_text())["fused"] == report["fused"]
    assert (tmp_path / "candidates" / "fused.onnx").is_file()
    halves = ef.verify(fused, mlps, (x, y))  # no validation data: the first half chooses, the second is test
    assert halves["n_validation"] == len(x) // 2 and "first" in halves["validation_data"]
    with pytest.raises(ef.EdgefuseError, match="labelled test data"):
        ef.verify(fused, mlps, [x])
