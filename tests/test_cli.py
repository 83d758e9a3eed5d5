import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import edgefuse as ef
from edgefuse.cli import cli
from edgefuse.models.data import batches
from edgefuse.models.data import load_dataset

REPORT_KEYS = ("accuracy", "nll", "macs", "params", "latency_ms")


@pytest.fixture
def checkpoints(cnn_checkpoints):
    return cnn_checkpoints


def run(*args):
    return CliRunner().invoke(cli, ["-q", *args])


def documented_keys() -> tuple[set[str], set[str], set[str]]:
    """The three key lists of docs/report-format.md: always in report.json, only where they apply, every row's."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "report-format.md").read_text()
    lists = [line for line in text.splitlines() if line.startswith(("- report.json, ", "- every candidate row: "))]
    assert len(lists) == 3, lists
    return tuple({k.split("`")[0] for k in line.split(": ", 1)[1].split("`")[1::2]} for line in lists)


def test_export_end_to_end(checkpoints, tmp_path):
    res = run("export", "--model", "tests.nets:digits_cnn", *checkpoints, "--dataset", "digits",
              "--out-root", str(tmp_path), "--cache", str(tmp_path / "cache"))  # built here, nothing kept before
    assert res.exit_code == 0, res.output
    out = tmp_path / "cpu-ort"
    for name in ("model.onnx", "report.json", "report.md", "pareto.png"):
        assert (out / name).is_file()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "cpu-ort" and report["n_models"] == 3
    for entry in ("single", "ensemble", "ensemble_batched", "ensemble_sessions", "fused", "distilled_member"):
        assert all(k in report[entry] for k in REPORT_KEYS)
        assert set(report[entry]["latency_ms"]) >= {"min", "p50", "p90", "p99"}
        assert {"validation", "test"} <= set(report[entry])
    assert report["parity"]["max_abs_diff"] < 1e-4
    assert report["fused"]["macs"] <= 0.5 * report["ensemble"]["macs"]
    # Fused points over the MACs budget in every form are listed, unbuilt; every fused row built is within it.
    cap = report["budget"]["max_macs_ratio"] * report["ensemble"]["macs"]
    assert all(p["macs"] > cap and p["why"] for p in report["pruned"])
    assert not {p["key"] for p in report["pruned"]} & {c["key"] for c in report["candidates"]}
    assert all(c["macs"] <= cap for c in report["candidates"] if c["kind"] == "fused")
    kinds = [c["kind"] for c in report["candidates"]]
    assert kinds.count("member") == 3 and kinds.count("ensemble") == 3 and kinds.count("distilled member") == 1
    # The middle ground: with 3 members, the pair that greedy selection on validation picks, batched, with heads.
    subs = [c for c in report["candidates"] if c["kind"] == "sub-ensemble"]
    assert len(subs) == 1 and len(subs[0]["members"]) == 2
    assert abs(subs[0]["macs"] / report["ensemble"]["macs"] - 2 / 3) < 0.01
    assert report["distillation"]["teacher"] in {report["ensemble"]["label"], subs[0]["label"]}
    # Nothing in the report dominates what shipped: validation accuracy at least as high and expected latency per
    # call (what cpu-ort's budget binds) no higher at every batch size. The tie rule's one exception: a member
    # within noise of what would ship, on validation and in latency, ships instead, and its reason says so.
    assert report["budget"]["binds"] == "mean"
    shipped = next(c for c in report["candidates"] if c["key"] == report["shipped"]["key"])
    yielded = "not clearly slower" in report["shipped"]["reason"]
    assert shipped["dominated_by"] is None or yielded and shipped["kind"] in ("member", "distilled member")
    for c in report["candidates"]:
        if c is not shipped and not yielded:
            assert not (c["validation"]["accuracy"] >= shipped["validation"]["accuracy"] and all(
                c["latency_by_batch"][b]["expected"] <= shipped["latency_by_batch"][b]["expected"]
                for b in shipped["latency_by_batch"])), c["key"]
        assert ("dominated_by" in c) and (c["dominated_by"] is None or c["dominated_by"] in
                                          {d["key"] for d in report["candidates"]})
    for c in report["candidates"]:  # every file the report names was published next to it
        assert (out / c["file"]).is_file() if c.get("file") else c["key"] == "ensemble_sessions"
    # Cascades from the member most accurate on validation, each one graph whose cost is measured on a stream.
    cascades = [c for c in report["candidates"] if c["kind"] == "cascade"]
    best = max((c for c in report["candidates"] if c["kind"] == "member"),
               key=lambda c: (c["validation"]["accuracy"], -c["validation"]["nll"]))
    assert cascades and all(f"member{c['cascade']['first']}" == best["key"] for c in cascades)
    for c in cascades:
        assert (out / c["cascade"]["stages"][1]).is_file() and c["macs"] <= c["cascade"]["macs_worst"]
        assert set(c["latency_by_batch"]["1"]) >= {"mean", "p50", "p99"}
    assert report["ensemble_batched"]["accuracy"] == report["ensemble"]["accuracy"]
    assert report["ensemble_batched"]["onnx_nodes"] < report["ensemble"]["onnx_nodes"]
    # The contract: docs/report-format.md lists every key, and each always-present one is there.
    always, sometimes, row_keys = documented_keys()
    assert set(report) <= always | sometimes and always <= set(report), set(report) ^ always
    assert all(set(c) == row_keys for c in report["candidates"]), set(report["candidates"][0]) ^ row_keys
    # Where the time went: every phase, and their total. These members were trained apart: no merges.
    phases = report["seconds"]
    assert {"models", "data", "align", "members", "ensembles", "cascades", "fused points", "distilled"} <= set(phases)
    assert "merges" not in phases and report["regime"]["name"] == "from scratch"
    assert abs(phases.pop("total") - sum(phases.values())) < 0.05 and min(phases.values()) >= 0
    for c in report["candidates"]:  # and per row: what built it, its export and its measurement
        steps = set(c["seconds"] or ())
        assert steps >= {"export", "measure"} or c["key"] == "ensemble_sessions", c["key"]
        assert ("distill" in steps) == bool(c["distill"])  # a distilled point starts from a copy of the point
        assert ("fuse and repair" in steps) == (c["kind"] == "fused" and not c["distill"])  # built before it
        assert (c["form"] in ("blocks", "dense", "branches")) == (c["alpha"] is not None)  # the fastest form, timed
    # Rows with heads are scored on their disagreement too; the shipped model's flagging rule lands beside it.
    for c in report["candidates"]:
        has_heads = c["kind"] in ("ensemble", "sub-ensemble") or bool(c["depth"])
        assert (c["test"]["heads_auroc"] is not None) == has_heads, c["key"]
    rule = json.loads((out / "uncertainty.json").read_text())
    assert rule == report["shipped"]["uncertainty"] == shipped["uncertainty"]
    assert rule["signal"] in ("max_softmax", "mutual_information") and 0 <= rule["test"]["flagged"] <= 1
    for b, base in report["baseline_by_batch"].items():
        assert base["p50"] == min(report[e]["latency_by_batch"][b]["p50"]
                                  for e in ("ensemble", "ensemble_batched", "ensemble_sessions"))
    # Latency against arithmetic, per row, with the fastest member (as cheap as every member) as the yardstick.
    members = [c for c in report["candidates"] if c["kind"] == "member"]
    for b in map(str, report["batch_sizes"]):
        assert min(m["latency_per_mac"][b] for m in members) == 1.0
        assert all(c["latency_per_mac"][b] > 0 for c in report["candidates"])


def test_fuse_then_verify(checkpoints, tmp_path):
    out = tmp_path / "f.onnx"
    res = run("fuse", "--model", "tests.nets:digits_cnn", *checkpoints, "--dataset", "digits", "--depth", "2",
              "-o", str(out))
    assert res.exit_code == 0, res.output
    res = run("verify", str(out), "--dataset", "digits", "--batch", "1", "--batch", "4")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert set(result["latency_ms"]) == {"1", "4"}
    models = ef.load_models("tests.nets:digits_cnn", checkpoints)  # the same job through the Python API
    s = load_dataset("digits")
    x, y = s.x_test, s.y_test
    spec = ef.permutation_spec(models[0], x[:2])
    calib = batches(s.calib, batch_size=200)
    fused = ef.fuse(ef.align(models, spec, data=calib), spec, depth=2, data=calib)  # the defaults: activation, lsq
    with torch.no_grad():
        expected = (fused(x).argmax(1) == y).double().mean().item()
    assert result["accuracy"] == pytest.approx(expected, abs=2e-3)


def test_fuse_alpha_with_partial_ot_exports(checkpoints, tmp_path):
    out = tmp_path / "a.onnx"
    res = run("fuse", "--model", "tests.nets:digits_cnn", *checkpoints, "--dataset", "digits", "--alpha", "0.5",
              "--select", "partial-ot", "-o", str(out))
    assert res.exit_code == 0, res.output
    res = run("verify", str(out), "--dataset", "digits", "--batch", "2")
    assert res.exit_code == 0, res.output
    models = ef.load_models("tests.nets:digits_cnn", checkpoints)
    s = load_dataset("digits")
    x, y = s.x_test, s.y_test
    spec = ef.permutation_spec(models[0], x[:2])
    calib = batches(s.calib, batch_size=200)
    fused = ef.fuse(ef.align(models, spec, data=calib), spec, alpha=0.5, data=calib, select="partial-ot")
    with torch.no_grad():
        expected = (fused(x).argmax(1) == y).double().mean().item()
    assert json.loads(res.stdout)["accuracy"] == pytest.approx(expected, abs=2e-3)


def _one_line_error(res, code, text):
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in res.output


def test_existing_output_needs_force(checkpoints, tmp_path):
    out = tmp_path / "f.onnx"
    out.write_bytes(b"keep me")
    res = run("fuse", "--model", "tests.nets:digits_cnn", *checkpoints, "--dataset", "digits", "--depth", "1",
              "-o", str(out))
    _one_line_error(res, 1, "use --force")
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("args,text", [
    (["export", "--target", "nowhere"], "unknown target 'nowhere'"),
    (["fuse", "--model", "tests.nets:digits_cnn", "missing.pt", "other.pt", "--depth", "1", "-o", "x.onnx"],
     "checkpoint not found"),
    (["fuse", "--model", "tests.nets:digits_cnn", "only.pt", "--depth", "1", "-o", "x.onnx"], "at least 2"),
    (["verify", "nothing.onnx"], "ONNX file not found"),
])
def test_bad_input_is_one_line(args, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(run(*args), 1, text)
    assert not (tmp_path / "x.onnx").exists()


def test_truncated_onnx_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04trun")
    _one_line_error(run("verify", str(bad), "--dataset", "digits"), 1, "holds no ONNX graph")


def test_help_says_what_commands_read_and_write():
    for cmd in ("train", "fuse", "export", "verify"):
        res = run(cmd, "--help")
        assert res.exit_code == 0 and "Reads" in res.output and "rite" in res.output


def test_export_for_a_tensorrt_target_writes_a_checked_bundle(checkpoints, tmp_path):
    import onnx

    res = run("export", "--model", "tests.nets:digits_cnn", *checkpoints, "--dataset", "digits",
              "--target", "jetson-xavier-nx-jp5", "--out-root", str(tmp_path))
    assert res.exit_code == 0, res.output
    out = tmp_path / "jetson-xavier-nx-jp5"
    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 17
    assert onnx.load(str(out / "bundle" / "model.onnx")).opset_import[0].version == 17
    report = json.loads((out / "report.json").read_text())
    assert report["static_check"]["ok"] and report["bundle"]["self_check_onnxruntime"]["ok"]
    assert abs(report["fp16"]["accuracy_drop"]) < 0.02
    assert "TensorRT target" in (out / "report.md").read_text()


def test_export_for_an_int8_dla_target_bundles_the_int8_graph(checkpoints, tmp_path):
    from pathlib import Path

    from edgefuse.targets import load_target

    agx = Path(load_target("jetson-agx-orin-jp6").source).read_text()
    (tmp_path / "agx.toml").write_text(agx + "\ndistill_steps = 0\n")  # time: no distilling
    res = run("export", "--model", "tests.nets:digits_cnn", *checkpoints, "--dataset", "digits", "--depth", "1",
              "--target", str(tmp_path / "agx.toml"), "--out-root", str(tmp_path))
    assert res.exit_code == 0, res.output
    out = tmp_path / "agx"
    report = json.loads((out / "report.json").read_text())
    rows = {c["key"]: c for c in report["candidates"]}
    fp32 = [k for k, c in rows.items() if c["precision"] == "fp32" and k != "ensemble_sessions"
            and c["kind"] != "cascade"]  # a cascade runs its members' FP32 graphs
    assert fp32 and all(f"{k}-int8" in rows for k in fp32)  # every other candidate weighed in INT8 too
    for key in fp32:
        int8 = rows[f"{key}-int8"]
        assert int8["quantization"]["calibration"]["split"] == "train" and int8["macs"] == rows[key]["macs"]
    assert report["static_check_int8"]["ok"] and report["bundle"]["self_check_int8_onnxruntime"]["ok"]
    assert abs(report["int8"]["accuracy_drop"]) < 0.05 and report["int8"]["calibration"]["split"] == "train"
    assert json.loads((out / "bundle" / "int8" / "target.json").read_text())["graph"] == "int8"
