"""Bad input: one clear line, a non-zero exit, and no output created or changed."""
import hashlib
import math
import os
import pickle

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import edgefuse as ef
from edgefuse.models import data
from edgefuse.jobs import export as pipeline
from edgefuse.cli import cli

from . import nets

CNN = "tests.nets:digits_cnn"


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def work(tmp_path, monkeypatch, cnns):
    """A folder with good checkpoints, an earlier output, and the snapshot to compare against afterwards."""
    monkeypatch.chdir(tmp_path)
    for i, m in enumerate(cnns[:2]):
        save_file(m.state_dict(), tmp_path / f"m{i}.safetensors")
    (tmp_path / "out.onnx").write_bytes(b"earlier output")
    return tmp_path


def fails(work, args, text, code=1):
    before = snapshot(work)
    res = CliRunner().invoke(cli, ["-q", *args])
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert snapshot(work) == before
    return res


def fuse_args(*ckpts, out="new.onnx"):
    return ["fuse", "--model", CNN, *ckpts, "--dataset", "digits", "--depth", "1", "-o", out]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EDGEFUSE_PWNED']}",))


def test_malicious_pickle_does_not_run(work, monkeypatch):
    monkeypatch.setenv("EDGEFUSE_PWNED", str(work / "pwned"))
    (work / "evil.pt").write_bytes(pickle.dumps({"1.weight": Payload()}))
    fails(work, fuse_args("m0.safetensors", "evil.pt"), "cannot read checkpoint evil.pt")
    assert not (work / "pwned").exists()


def test_missing_checkpoint(work):
    fails(work, fuse_args("m0.safetensors", "gone.safetensors"), "checkpoint not found: gone.safetensors")


def test_checkpoint_of_another_architecture(work):
    save_file(nets.digits_mlp().state_dict(), work / "mlp.safetensors")
    fails(work, fuse_args("m0.safetensors", "mlp.safetensors"), "does not fit the architecture: missing key")


def test_checkpoint_with_wrong_shape(work, cnns):
    state = dict(cnns[0].state_dict())
    state["1.weight"] = torch.zeros(5, 1, 3, 3)
    save_file(state, work / "wide.safetensors")
    fails(work, fuse_args("m0.safetensors", "wide.safetensors"), "'1.weight' has shape (5, 1, 3, 3)")


def test_nan_weights(work, cnns):
    state = {k: v.clone() for k, v in cnns[1].state_dict().items()}
    state["4.weight"][0, 0, 0, 0] = math.nan
    save_file(state, work / "nan.safetensors")
    fails(work, fuse_args("m0.safetensors", "nan.safetensors"), "'4.weight' holds NaN or Inf")


def test_truncated_checkpoint(work):
    (work / "cut.safetensors").write_bytes((work / "m1.safetensors").read_bytes()[:200])
    fails(work, fuse_args("m0.safetensors", "cut.safetensors"), "cannot read checkpoint cut.safetensors")


def test_single_model(work):
    fails(work, fuse_args("m0.safetensors"), "at least 2 checkpoints")


def test_existing_output_without_force(work):
    fails(work, fuse_args("m0.safetensors", "m1.safetensors", out="out.onnx"), "use --force")


def test_input_shape_that_does_not_fit(work):
    fails(work, ["fuse", "--model", "zoo:cnn", "m0.safetensors", "m1.safetensors", "--dataset", "digits",
                 "--depth", "1", "-o", "new.onnx"], "does not fit")


def test_truncated_onnx(work):
    (work / "cut.onnx").write_bytes(b"\x08\x07\x12\x04trun")
    fails(work, ["verify", "cut.onnx", "--dataset", "digits"], "cut.onnx holds no ONNX graph")


@pytest.mark.parametrize("command", [["verify"], ["check", "--target", "jetson-orin-nano-jp6"]])
def test_an_empty_onnx_file_is_named_as_empty(work, command):
    (work / "empty.onnx").write_bytes(b"")
    fails(work, [command[0], *command[1:], "empty.onnx"], "empty.onnx is empty (0 bytes)")


@pytest.mark.skipif(not data.Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_onnx_for_other_inputs(work, cnns):
    ef.export_onnx(cnns[0], torch.rand(2, 1, 8, 8), work / "digits.onnx")
    fails(work, ["verify", "digits.onnx", "--dataset", "fashion-mnist"], "does not run on fashion-mnist inputs")


def test_unknown_target(work):
    fails(work, ["export", "--target", "jetson-nowhere"], "unknown target 'jetson-nowhere' (available: cpu-ort")


@pytest.mark.parametrize("text,message", [("runtime = [", "malformed target file"),
                                          ('runtime = "onnxruntime"\ndevice = "cpu"\nturbo = 1', "unknown key 'turbo'"),
                                          ('runtime = "onnxruntime"\ndevice = "cpu"\nbatch_sizes = [0]',
                                           "batch_sizes must be a non-empty list of integers from 1 to 65536")])
def test_bad_target_file(work, text, message):
    (work / "mine.toml").write_text(text)
    fails(work, ["export", "--target", "mine.toml"], message)


def test_missing_dataset(work, monkeypatch):
    monkeypatch.setattr(data, "FASHION_DIRS", (str(work / "nowhere"),))
    fails(work, ["fuse", "--model", CNN, "m0.safetensors", "m1.safetensors", "--dataset", "fashion-mnist",
                 "--depth", "1", "-o", "new.onnx"], "apt-get install dataset-fashion-mnist")


def test_export_failure_midway_keeps_earlier_export(work, monkeypatch):
    args = ["export", "--model", CNN, "m0.safetensors", "m1.safetensors", "--dataset", "digits", "--out-root", "b",
            "--depth", "1"]
    assert CliRunner().invoke(cli, ["-q", *args]).exit_code == 0
    fails(work, args, "holds an earlier export (use --force")

    def boom(*a, **k):
        raise ef.EdgefuseError("disk full")

    monkeypatch.setattr(pipeline, "write_report", boom)
    fails(work, [*args, "--force"], "disk full")
    assert not [p for p in (work / "b").iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_debug_shows_the_traceback(work):
    res = CliRunner().invoke(cli, ["--debug", "verify", "nothing.onnx"])
    assert res.exit_code != 0 and isinstance(res.exception, ef.EdgefuseError)


@pytest.mark.parametrize("mutate,message", [
    (lambda ms: ms[1].train(), "training mode"),
    (lambda ms: setattr(ms[1][2], "track_running_stats", False), "no running statistics"),
    (lambda ms: ms.__setitem__(1, nets.digits_mlp().eval()), "different architecture"),
])
def test_models_are_checked_before_fusing(cnns, mutate, message):
    import copy
    models = [copy.deepcopy(m) for m in cnns[:2]]
    mutate(models)
    spec = ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8))
    with pytest.raises(ef.EdgefuseError, match=message):
        ef.fuse(models, spec, depth=1, data=[torch.rand(4, 1, 8, 8)])


def test_empty_calibration_set(cnns):
    spec = ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8))
    with pytest.raises(ef.EdgefuseError, match="calibration set is empty"):
        ef.fuse(cnns, spec, depth=1, data=[])
