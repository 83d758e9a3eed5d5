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
    cascades = sum(c["kind"] == "cascade" for c in sweep["candidates"])
    assert cascades and {c["kind"] for c in sweep["candidates"][7:7 + cascades]} == {"cascade"}
    method, rest = RunConfig.methods[0], 7 + cascades
    assert keys[rest:rest + 3] == [f"{method}-depth1-lsq", f"{method}-depth2-lsq", f"{method}-alpha0.5-lsq"]
    assert {c["kind"] for c in sweep["candidates"][rest + 3:]} == {"distilled member", "fused"}
    assert all(c["peak_memory_mb"] >= 0 for c in sweep["candidates"])  # tiny nets may not raise the peak
    assert sweep["shipped"]["key"] in keys and sweep["candidates"][keys.index(sweep["shipped"]["key"])][
        "dominated_by"] is None
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert len(stamps) == len(keys) - 4 - cascades  # the exact ensembles, sub-ensembles, cascades run here
    res = CliRunner().invoke(cli, args)  # resumed: no point is recomputed
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == stamps
    again = json.loads((out / "sweep.json").read_text())
    def measured(rows: list[dict]) -> list[dict]:
        """Stored rows without `dominated_by`: the exact ensembles, sub-ensembles and cascades are timed afresh, so
        that verdict may change."""
        return [{k: v for k, v in c.items() if k != "dominated_by"} for c in rows
                if c["kind"] not in ("ensemble", "sub-ensemble", "cascade")]

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


def test_ctrl_c_during_a_sweep_with_workers_is_one_line(checkpoints, tmp_path):
    """Ctrl-C reaches the whole process group: the workers leave it to the parent, which stops them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-c", "from edgefuse.cli.main import main; main()", "-q", "sweep", "--model",
            "tests.nets:digits_mlp", *checkpoints, "--dataset", "digits", "--alpha", "0.1", "--alpha", "0.25",
            "--alpha", "0.5", "--alpha", "0.75", "--workers", "2", "--distill-steps", "0", "--out-root", str(tmp_path)]
    # As from a terminal: Ctrl-C's default action, even where this test runs with SIGINT ignored (a background job,
    # a test worker), which the sweep would inherit.
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    points = tmp_path / "cpu-ort" / "sweep" / "points"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (points.is_dir() and any(points.iterdir())):
        time.sleep(0.2)
    time.sleep(1.0)  # workers busy with their points
    if proc.poll() is not None:
        pytest.skip("the sweep finished before it could be interrupted")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
