"""Targets, the static TensorRT check, FP16 graphs and the deploy bundle, all without a GPU."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import edgefuse as ef
from edgefuse.models import zoo
from edgefuse.device.bundle import write_bundle
from edgefuse.device.check import check_onnx
from edgefuse.device.stage import build_engine
from edgefuse.graph.fp16 import export_fp16
from edgefuse.measure.runners import OrtRunner
from edgefuse.targets import available_targets, load_target, parse_target

from . import nets

ROOT = Path(__file__).resolve().parents[1]
TRT_TARGETS = ["jetson-orin-nano-jp6", "jetson-agx-orin-jp6", "jetson-xavier-nx-jp5", "desktop-trt10", "desktop-trt11"]
X = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
NO_TRT = "TensorRT Python bindings not installed (their wheels fetch the libraries from NVIDIA's own index)"


@pytest.fixture(scope="module")
def fused_cnn():
    models = [nets.member(lambda: zoo.cnn(width=4), s) for s in range(3)]
    spec = ef.permutation_spec(models[0], X[:2])
    return ef.fuse(models, spec, depth=2, data=[X], batch_heads=True)


def test_every_target_file_loads():
    assert set(TRT_TARGETS) | {"cpu-ort", "desktop-cuda"} <= set(available_targets())
    for name in available_targets():
        t = load_target(name)
        assert t.name == name and min(t.batch_sizes) >= t.batch_profile[0]
    assert load_target("jetson-xavier-nx-jp5").opset == 17
    assert load_target("desktop-trt11").strongly_typed


BASE = 'runtime = "tensorrt"\ndevice = "jetson-agx-orin"\ntensorrt = "10.3"\nprecision = "fp16"\n'


@pytest.mark.parametrize("extra,message", [
    ('dla_core = 0\nbatch_sizes = [1, 8]\n', "DLA needs a static batch"),
    ('dla_core = 0\nbatch_sizes = [1]\nprecision = "fp32"\n', "DLA runs FP16 or INT8 only"),
    ('opset = 18\ntensorrt = "8.5"\n', "parses ONNX opsets 7 to 17"),
    ('tensorrt = "11.0"\n', "strongly typed"),
    ('tensorrt = "11.1"\nstrongly_typed = true\ndla_core = 0\n', "has no DLA"),
    ('profile = [8, 1, 4]\n', "profile must be"),
    ('profile = [1, 1, 1000000000]\n', "max <= 65536"),
    ('latency_binds = "p50"\n', 'latency_binds must be "mean" or "p99"'),
    ('workspace = 3\n', "unknown key 'workspace'"),
    ('precisions = ["int4"]\n', "precisions must be a list of"),
    ('precisions = ["fp32", "int8"]\n', "must include the target's precision 'fp16'"),
    ('int8_keep_ends = "yes"\n', "int8_keep_ends must be true or false"),
])
def test_impossible_targets_are_refused(extra, message):
    text = "\n".join(dict((line.split(" = ")[0], line) for line in (BASE + extra).splitlines()).values())
    with pytest.raises(ef.EdgefuseError, match=message):
        parse_target("bad", text, "bad.toml")


def test_opset17_target_gets_an_opset17_model_that_passes(fused_cnn, tmp_path):
    target = load_target("jetson-xavier-nx-jp5")
    path = ef.export_onnx(fused_cnn, X[:2], tmp_path / "m.onnx", opset=target.opset)
    assert onnx.load(str(path)).opset_import[0].version == 17
    report = check_onnx(path, target)
    assert report.ok, report.errors
    assert report.table_version == "8.5" and "Conv" in report.operators


def test_static_check_flags_an_unsupported_operator(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Hardswish(), nn.Linear(16, 10)).eval()
    path = ef.export_onnx(model, X[:2], tmp_path / "hs.onnx", opset=17)
    assert "HardSwish" in {n.op_type for n in onnx.load(str(path)).graph.node}
    report = check_onnx(path, load_target("jetson-xavier-nx-jp5"))
    assert not report.ok and any("HardSwish" in e for e in report.errors)
    assert check_onnx(path, load_target("desktop-trt10")).ok  # 10.x parses HardSwish


def test_static_check_flags_opset_and_fixed_batch(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (X[:1],), str(path), opset_version=18, dynamo=False, input_names=["input"])
    report = check_onnx(path, load_target("jetson-xavier-nx-jp5"))
    assert any("opset 18" in e for e in report.errors)
    assert any("fixed batch" in e for e in report.errors)


def test_dla_fallback_is_listed(fused_cnn, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    target = load_target("jetson-agx-orin-jp6")
    path = ef.export_onnx(model.eval(), X[:2], tmp_path / "gap.onnx", opset=target.opset)
    report = check_onnx(path, target)
    pool = {"ReduceMean", "GlobalAveragePool"} & set(report.operators)  # as the exporter writes the average pool
    assert report.ok and pool and pool <= set(report.dla_fallback) and "Conv" not in report.dla_fallback


@pytest.mark.parametrize("io", ["fp32", "fp16"])
def test_fp16_graph_matches_fp32(fused_cnn, tmp_path, io):
    path = export_fp16(fused_cnn, X[:2], tmp_path / "h.onnx", opset=18, io_precision=io)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    types = {init.data_type for init in onnx.load(str(path)).graph.initializer} & floats
    assert types == {onnx.TensorProto.FLOAT16}  # every weight in half precision
    x = X.half().numpy() if io == "fp16" else X.numpy()
    got = OrtRunner(path)(x).astype(np.float32)
    with torch.no_grad():
        ref = fused_cnn(X).numpy()
    assert np.abs(got - ref).max() <= 1e-2 * max(1.0, np.abs(ref).max())


def _bundle(fused_cnn, tmp_path):
    target = load_target("desktop-trt11")
    path = export_fp16(fused_cnn, X[:2], tmp_path / "h.onnx", opset=18)
    checks = write_bundle(tmp_path, target, path, fused_cnn, X, "test")
    return tmp_path / "bundle", checks["model"]


def test_bundle_self_check_passes_and_catches_tampering(fused_cnn, tmp_path):
    bundle, check = _bundle(fused_cnn, tmp_path)
    assert check["ok"] and check["batch"] == load_target("desktop-trt11").batch_profile[2]
    assert {p.name for p in bundle.iterdir()} >= {"model.onnx", "deploy.py", "golden_inputs.npy",
                                                 "reference_outputs.npz", "target.json", "desktop-trt11.toml",
                                                 "README.md"}
    run = [sys.executable, str(bundle / "deploy.py"), "--runtime", "onnxruntime"]
    ok = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd="/")  # standalone, no edgefuse
    assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stdout + ok.stderr
    refs = dict(np.load(bundle / "reference_outputs.npz"))
    refs["out0"][0, 0] += 1.0
    np.savez(bundle / "reference_outputs.npz", **refs)
    bad = subprocess.run(run, capture_output=True, text=True, timeout=300, cwd="/")
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "output 0" in bad.stdout


def _breakers():
    def nan_refs(b):
        refs = dict(np.load(b / "reference_outputs.npz"))
        refs["out0"][:] = np.nan
        np.savez(b / "reference_outputs.npz", **refs)

    def one_inf_ref(b):
        refs = dict(np.load(b / "reference_outputs.npz"))
        refs["out0"][0, 0] = np.inf
        np.savez(b / "reference_outputs.npz", **refs)

    def string_tolerance(b):
        t = json.loads((b / "target.json").read_text())
        t["atol"] = "0.1"
        (b / "target.json").write_text(json.dumps(t))

    return {
        "NaN references": (nan_refs, "NaN or Inf"),
        "one Inf reference": (one_inf_ref, "NaN or Inf"),
        "broken target.json": (lambda b: (b / "target.json").write_text("{not json"), "not a valid target file"),
        "string tolerance": (string_tolerance, "atol and rtol must be non-negative numbers"),
        "pickled inputs": (lambda b: np.save(b / "golden_inputs.npy", np.array([{"a": 1}], dtype=object)),
                           "cannot read the bundle's golden inputs"),
        "truncated model": (lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:100]),
                            "could not check the bundle"),
    }


@pytest.mark.parametrize("case", list(_breakers()))
def test_broken_bundle_is_one_line_and_exit_2(fused_cnn, tmp_path, case):
    bundle, _ = _bundle(fused_cnn, tmp_path)
    breaker, message = _breakers()[case]
    breaker(bundle)
    res = subprocess.run([sys.executable, str(bundle / "deploy.py"), "--runtime", "onnxruntime"],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "PASS" not in res.stdout


def test_bundle_without_tensorrt_says_why(fused_cnn, tmp_path):
    bundle, _ = _bundle(fused_cnn, tmp_path)
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here: the missing-bindings path cannot be exercised")
    res = subprocess.run([sys.executable, str(bundle / "deploy.py"), "--runtime", "tensorrt"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "TensorRT Python bindings" in res.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(), reason=NO_TRT)
def test_engine_builds_and_matches(fused_cnn, tmp_path):
    from edgefuse.device.deploy import check_bundle

    bundle, _ = _bundle(fused_cnn, tmp_path)
    result = check_bundle(bundle, "tensorrt")
    assert result["ok"], result["problems"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the refusal path cannot be exercised")
def test_build_without_a_gpu_is_one_clear_error(fused_cnn, tmp_path):
    path = ef.export_onnx(fused_cnn, X[:2], tmp_path / "m.onnx")
    with pytest.raises(ef.EdgefuseError, match="needs an NVIDIA GPU"):
        build_engine(path, load_target("desktop-trt10"), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_check_cli_exit_codes(fused_cnn, tmp_path):
    from click.testing import CliRunner

    from edgefuse.cli import cli

    good = ef.export_onnx(fused_cnn, X[:2], tmp_path / "m.onnx", opset=17)
    res = CliRunner().invoke(cli, ["check", "--target", "jetson-xavier-nx-jp5", "--json", str(good)])
    assert res.exit_code == 0 and json.loads(res.output)["ok"]
    res = CliRunner().invoke(cli, ["check", "--target", "cpu-ort", str(good)])
    assert res.exit_code == 1 and "not TensorRT" in res.output


def test_an_int8_bundle_carries_the_qdq_graph_and_passes_its_self_check(fused_cnn, tmp_path):
    import json

    from edgefuse.device import deploy
    from edgefuse.graph.int8 import quantize_int8

    target = load_target("jetson-agx-orin-jp6")
    fp32 = ef.export_onnx(fused_cnn, X[:2], tmp_path / "m.onnx", opset=target.opset)
    int8 = quantize_int8(fp32, torch.rand(64, 1, 28, 28), tmp_path / "q.onnx")
    checks = write_bundle(tmp_path, target, fp32, fused_cnn, X, "test", int8)
    assert checks["model"]["ok"] and checks["int8"]["ok"]
    sub = tmp_path / "bundle" / "int8"
    spec = json.loads((sub / "target.json").read_text())
    assert spec["graph"] == "int8" and spec["dla_core"] == target.dla_core
    assert json.loads((sub / "calibration.json").read_text())["calibration"]["images"] == 64
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(sub / "model.onnx")).graph.node}
    refs = np.load(sub / "reference_outputs.npz")["out0"]
    np.savez(sub / "reference_outputs.npz", out0=refs + 1.0)  # beyond the INT8 tolerance: must not PASS
    assert not deploy.check_bundle(sub, "onnxruntime")["ok"]


def test_builder_flags_follow_precision_graph_and_typing():
    from edgefuse.device import engines
    from edgefuse.device.bundle import target_dict

    agx = target_dict(load_target("jetson-agx-orin-jp6"))
    assert engines.precision_flags(agx) == ["FP16"]
    assert engines.precision_flags(agx | {"graph": "int8"}) == ["FP16", "INT8"]
    assert engines.precision_flags(target_dict(load_target("desktop-trt11")) | {"graph": "int8"}) == []
    assert engines.precision_flags(agx | {"precision": "fp32"}) == []
