"""The device decides: a TensorRT target's bundle carries the accuracy-for-MACs frontier, and `deploy.py --choose`
times every candidate there and ships the most accurate that fits. Run here end to end with onnxruntime."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgefuse.base import tie_rule
from edgefuse.cli import cli
from edgefuse.targets import load_target


@pytest.fixture(scope="module")
def export(cnn_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    nano = Path(load_target("jetson-orin-nano-jp6").source).read_text()
    (root / "nano.toml").write_text(nano + "\ndistill_steps = 0\n")  # time: no distilling
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.nets:digits_cnn", *cnn_checkpoints,
                                   "--dataset", "digits", "--target", str(root / "nano.toml"),
                                   "--out-root", str(root)])
    assert res.exit_code == 0, res.output
    return root / "nano"


def bundle_copy(export, tmp_path) -> Path:
    return Path(shutil.copytree(export / "bundle", tmp_path / "bundle"))


def choose(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "deploy.py"), "--choose", "--runtime", "onnxruntime",
                           "--seconds", "0.02", *args], capture_output=True, text=True, cwd=bundle.parent)


def test_the_bundle_carries_the_frontier_with_a_manifest(export):
    report = json.loads((export / "report.json").read_text())
    manifest = json.loads((export / "bundle" / "candidates.json").read_text())
    rows = manifest["candidates"]
    assert len(rows) >= 2 and manifest["batch_sizes"] == [1, 8]
    assert manifest["latency_budget_ms"] == {"1": 1.0, "8": 1.0} and manifest["memory_budget_mb"] == 256
    assert (export / "bundle" / "tie_rule.py").read_bytes() == Path(tie_rule.__file__).read_bytes()
    assert [r["key"] for r in rows] == [c["key"] for c in report["device_choice"]["candidates"]]
    for r in rows:  # each a folder deploy.py can check, golden outputs included
        folder = export / "bundle" / r["folder"]
        assert {p.name for p in folder.iterdir()} >= {"model.onnx", "target.json", "golden_inputs.npy",
                                                      "reference_outputs.npz"}
        assert (export / "bundle" / r["golden"]).is_file() and r["graph"] == "fp32"
    # The frontier: no candidate of the report beats a sent one on validation accuracy at no higher MACs.
    by_key = {c["key"]: c for c in report["candidates"]}
    for r in rows:
        assert not any(c["validation"]["accuracy"] > r["validation"]["accuracy"] and c["macs"] <= r["macs"]
                       and c["precision"] == "fp32" and c["key"] not in ("ensemble", "ensemble_sessions")
                       for c in report["candidates"]), r["key"]
        assert by_key[r["key"]]["validation"] == r["validation"]
    assert manifest["host_choice"] == report["shipped"]["key"]
    assert "The device decides" in (export / "report.md").read_text()


def test_choose_with_a_generous_budget_ships_the_most_accurate(export, tmp_path):
    bundle = bundle_copy(export, tmp_path)
    res = choose(bundle, "--latency-ms", "10000")
    assert res.returncode == 0, res.stderr
    choice = json.loads((bundle / "choice.json").read_text())
    rows = choice["candidates"]
    assert len(rows) == len(json.loads((bundle / "candidates.json").read_text())["candidates"])
    for r in rows:  # measured here, at both batch sizes
        assert set(r["latency_ms"]) == {"1", "8"} and r["ok"] and r["fits"]
        assert all(0 < v["p50"] <= v["p99"] and v["runs"] >= 100 for v in r["latency_ms"].values())
    best = max(r["validation_accuracy"] for r in rows)
    chosen = next(r for r in rows if r["key"] == choice["chosen"])
    manifest = {r["key"]: r for r in json.loads((bundle / "candidates.json").read_text())["candidates"]}
    if chosen["validation_accuracy"] < best:  # only a clearly faster tie may beat the most accurate
        top = max(rows, key=lambda r: r["validation_accuracy"])
        assert manifest[top["key"]]["tie_z"][chosen["key"]] < 2.0
        assert all(chosen["latency_ms"][b]["p50"] <= 0.9 * top["latency_ms"][b]["p50"] for b in ("1", "8"))
    assert "chose" in res.stdout and choice["budget"]["latency_ms"] == {"1": 10000.0, "8": 10000.0}


def test_a_budget_below_every_candidate_exits_2_in_one_line_and_writes_nothing(export, tmp_path):
    bundle = bundle_copy(export, tmp_path)
    res = choose(bundle, "--latency-ms", "0.000001")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "the fastest is" in res.stderr
    assert not (bundle / "choice.json").exists()


def test_a_candidate_whose_outputs_differ_is_never_chosen(export, tmp_path):
    bundle = bundle_copy(export, tmp_path)
    manifest = json.loads((bundle / "candidates.json").read_text())
    top = max(manifest["candidates"], key=lambda r: r["validation"]["accuracy"])
    refs = bundle / top["golden"]
    np.savez(refs, out0=np.load(refs)["out0"] + 1.0)
    import hashlib  # as if its engine computed something else: the references stay the manifest's
    top["sha256"]["reference_outputs.npz"] = hashlib.sha256(refs.read_bytes()).hexdigest()
    (bundle / "candidates.json").write_text(json.dumps(manifest))
    res = choose(bundle, "--latency-ms", "10000")
    assert res.returncode == 0, res.stderr
    choice = json.loads((bundle / "choice.json").read_text())
    assert choice["chosen"] != top["key"] and "MISMATCH" in res.stdout
    assert next(r for r in choice["candidates"] if r["key"] == top["key"])["why_not"].startswith("outputs differ")


@pytest.mark.parametrize("edit", ["escape", "empty", "garbage"])
def test_a_broken_manifest_is_one_line_and_exit_2(export, tmp_path, edit):
    bundle = bundle_copy(export, tmp_path)
    path = bundle / "candidates.json"
    manifest = json.loads(path.read_text())
    if edit == "escape":
        manifest["candidates"][0]["folder"] = "../../elsewhere"
        path.write_text(json.dumps(manifest))
    elif edit == "empty":
        path.write_text(json.dumps(manifest | {"candidates": []}))
    else:
        path.write_text("{not json")
    res = choose(bundle)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (bundle / "choice.json").exists()


def _measured(key, kind, acc, p50):
    return {"key": key, "label": key, "kind": kind, "validation_accuracy": acc, "ok": True, "memory_mb": 10.0,
            "latency_ms": {"1": {"p50": p50}}}


@pytest.mark.parametrize("z, ships", [(1.0, "student"), (5.0, "depth4")])
def test_on_the_device_a_fused_pick_gives_way_to_a_tied_plainer_model(z, ships):
    from edgefuse.device.device_choice import pick

    measured = [_measured("depth4", "fused", 0.905, 1.0), _measured("student", "distilled member", 0.900, 1.05),
                _measured("ensemble", "ensemble", 0.910, 4.0)]
    manifest = {"candidates": [{"key": "depth4", "tie_z": {"student": z}}, {"key": "student", "tie_z": {}},
                               {"key": "ensemble", "tie_z": {}}]}
    chosen, reason = pick(measured, manifest, {"1": 2.0})
    assert chosen["key"] == ships
    assert ("fused model ships only where" in reason) == (ships == "student")


def test_on_the_device_the_budget_binds_what_the_target_says():
    from edgefuse.device.device_choice import pick

    def measured(key, acc, p50, p99):
        return {"key": key, "label": key, "kind": "member", "validation_accuracy": acc, "ok": True,
                "memory_mb": 10.0, "latency_ms": {"1": {"p50": p50, "expected": p50, "p99": p99}}}

    rows = [measured("jittery", 0.95, 0.5, 3.0), measured("steady", 0.90, 0.9, 1.0)]
    manifest = {"candidates": [{"key": "jittery", "tie_z": {"steady": 9.0}}, {"key": "steady", "tie_z": {}}]}
    assert pick(rows, manifest | {"latency_binds": "mean"}, {"1": 2.0})[0]["key"] == "jittery"
    chosen, reason = pick(rows, manifest | {"latency_binds": "p99"}, {"1": 2.0})
    assert chosen["key"] == "steady" and "p99 ≤ 2 ms" in reason
    assert rows[0]["why_not"] == "p99 over budget at batch 1"


@pytest.fixture(scope="module")
def cascade_export(cnn_checkpoints, tmp_path_factory):
    """A desktop TensorRT target (its budgets bind the mean, so cascades join the frontier at their mean MACs)."""
    root = tmp_path_factory.mktemp("device-cascade")
    trt = Path(load_target("desktop-trt10").source).read_text() + "\ndistill_steps = 0\n"
    (root / "trt.toml").write_text(trt)
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.nets:digits_cnn", *cnn_checkpoints,
                                   "--dataset", "digits", "--target", str(root / "trt.toml"),
                                   "--out-root", str(root)])
    assert res.exit_code == 0, res.output
    return root / "trt"


def test_a_cascade_goes_to_the_device_as_two_stages_and_passes_its_golden_check(cascade_export, tmp_path):
    bundle = bundle_copy(cascade_export, tmp_path)
    manifest = json.loads((bundle / "candidates.json").read_text())
    cascades = [r for r in manifest["candidates"] if r["kind"] == "cascade"]
    assert cascades and manifest["latency_binds"] == "mean"
    folder = bundle / cascades[0]["folder"]
    assert {"model.onnx", "cascade.json", "stream_inputs.npy"} <= {p.name for p in folder.iterdir()}
    assert (folder / "stage2" / "model.onnx").is_file() and (bundle / "cascade.py").is_file()
    res = subprocess.run([sys.executable, str(bundle / "deploy.py"), "--bundle", str(folder), "--runtime",
                          "onnxruntime", "--seconds", "0.05"], capture_output=True, text=True)
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout + res.stderr
    res = choose(bundle)
    assert res.returncode in (0, 2), res.stderr
    if res.returncode == 0:
        choice = json.loads((bundle / "choice.json").read_text())
        measured = {m["key"]: m for m in choice["candidates"]}
        assert measured[cascades[0]["key"]]["ok"] and choice["timing"]["statistic"] == "mean"


@pytest.mark.parametrize("damage", ["swap", "nan", "superset"])
def test_a_broken_cascade_folder_is_one_line_on_the_device(cascade_export, tmp_path, damage):
    bundle = bundle_copy(cascade_export, tmp_path)
    manifest = json.loads((bundle / "candidates.json").read_text())
    folder = bundle / next(r for r in manifest["candidates"] if r["kind"] == "cascade")["folder"]
    desc = json.loads((folder / "cascade.json").read_text())
    if damage == "swap":
        first = (folder / "model.onnx").read_bytes()
        (folder / "model.onnx").write_bytes((folder / "stage2" / "model.onnx").read_bytes())
        (folder / "stage2" / "model.onnx").write_bytes(first)
        text, says = json.dumps(desc), "digest"
    elif damage == "nan":
        desc["rule"]["threshold"] = float("nan")
        text, says = json.dumps(desc, allow_nan=True), "NaN"
    else:
        desc["rule"]["rest"] = [desc["rule"]["first"]]
        text, says = json.dumps(desc), "second stage"
    (folder / "cascade.json").write_text(text)
    res = subprocess.run([sys.executable, str(bundle / "deploy.py"), "--bundle", str(folder), "--runtime",
                          "onnxruntime"], capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("edit, says", [
    ("swap", "does not match its digest"),
    ("nan-budget", "NaN is not a number"),
    ("negative-budget", "latency_budget_ms must map batch sizes to positive numbers"),
    ("budget-batch", "latency_budget_ms names batch size 4, which is not among the batch sizes timed"),
    ("accuracy", "a validation accuracy from 0 to 1"),
    ("nan-accuracy", "NaN is not a number"),
])
def test_the_device_trusts_no_manifest_it_cannot_check(export, tmp_path, edit, says):
    bundle = bundle_copy(export, tmp_path)
    path = bundle / "candidates.json"
    manifest = json.loads(path.read_text())
    rows = manifest["candidates"]
    if edit == "swap":  # two candidate folders' graphs exchanged: each would still pass its own golden check
        a, b = (bundle / rows[0]["folder"], bundle / rows[1]["folder"])
        tmp = tmp_path / "swap"
        shutil.move(str(a), str(tmp))
        shutil.move(str(b), str(a))
        shutil.move(str(tmp), str(b))
        text = path.read_text()
    elif edit == "nan-budget":
        manifest["latency_budget_ms"] = {"1": float("nan"), "8": 1.0}
        text = json.dumps(manifest, allow_nan=True)
    elif edit == "negative-budget":
        manifest["latency_budget_ms"] = {"1": -1.0, "8": 1.0}
        text = json.dumps(manifest)
    elif edit == "budget-batch":
        manifest["latency_budget_ms"] = {"4": 1.0}
        text = json.dumps(manifest)
    elif edit == "accuracy":
        rows[0]["validation"]["accuracy"] = 7.5
        text = json.dumps(manifest)
    else:
        rows[0]["validation"]["accuracy"] = float("nan")
        text = json.dumps(manifest, allow_nan=True)
    path.write_text(text)
    res = choose(bundle)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr
    assert not (bundle / "choice.json").exists()


def test_choice_json_has_the_hosts_file_modes(export, tmp_path):
    bundle = bundle_copy(export, tmp_path)
    res = choose(bundle)
    if res.returncode == 0:
        assert (bundle / "choice.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask
