"""A hostile but fair user: non-finite numbers, reads that must not write, two exports racing for one folder,
stale leftovers of killed runs, and target files with values of the wrong type or range."""
import copy
import os
import shutil
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import edgefuse as ef
from edgefuse.cli import cli
from edgefuse.base.files import exclusive, publish
from edgefuse.measure.metrics import scores
from edgefuse.targets import load_target, parse_target

from .test_bad_input import CNN, snapshot


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_data_is_refused(cnns, poison):
    spec = ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8))
    calib = torch.rand(16, 1, 8, 8)
    calib[3, 0, 2, 2] = poison
    with pytest.raises(ef.EdgefuseError, match="calibration batch 0 holds 1 NaN or Inf"):
        ef.fuse(cnns, spec, depth=1, data=[calib])


def test_fuzzed_calibration_data_gives_a_refusal_or_a_finite_model(cnns):
    spec = ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8))
    gen = torch.Generator().manual_seed(0)
    values = (float("nan"), float("inf"), 1e30, -1e38, 3e38, 0.0)
    for trial in range(12):
        calib = torch.rand(32, 1, 8, 8, generator=gen)
        idx = torch.randint(0, calib.numel(), (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen)
        calib.view(-1)[idx] = values[trial % len(values)]
        try:
            fused = ef.fuse(cnns, spec, depth=1 + trial % 3, data=[calib])
        except ef.EdgefuseError:
            continue
        assert all(torch.isfinite(v).all() for v in fused.state_dict().values() if v.is_floating_point())
        with torch.no_grad():
            assert torch.isfinite(fused(torch.rand(4, 1, 8, 8))).all()


def test_a_checkpoint_that_overflows_when_fused_is_refused(cnns):
    models = [copy.deepcopy(m) for m in cnns[:2]]
    with torch.no_grad():
        models[0][1].weight.fill_(3e38)  # a finite conv weight whose outputs overflow: BN reset makes Inf/NaN
    spec = ef.permutation_spec(models[0], torch.rand(2, 1, 8, 8))
    with pytest.raises(ef.EdgefuseError, match="NaN or Inf values after fusion"):
        ef.fuse(models, spec, depth=1, data=[torch.rand(16, 1, 8, 8)])


def test_reading_a_model_never_changes_it(cnns):
    model = copy.deepcopy(cnns[0]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = ef.permutation_spec(model, torch.rand(2, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics bit-identical
    assert model.training and spec.groups == ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8)).groups
    with pytest.raises(ef.EdgefuseError, match="training mode"):
        ef.fuse([model, cnns[1]], spec, depth=1, data=[torch.rand(8, 1, 8, 8)])  # fusing it is still refused
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NaNAfter(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


def test_onnx_parity_fails_on_non_finite_outputs(tmp_path):
    with pytest.raises(ef.EdgefuseError, match="non-finite values"):
        ef.export_onnx(NaNAfter(), torch.rand(2, 1, 8, 8), tmp_path / "nan.onnx")
    assert not list(tmp_path.iterdir())


def test_scores_refuse_non_finite_outputs():
    logits = np.zeros((5, 3))
    logits[1, 2] = np.nan
    logits[4, 0] = np.inf
    with pytest.raises(ef.EdgefuseError, match="non-finite outputs for 2 of 5 inputs"):
        scores(logits, torch.zeros(5, dtype=torch.long))


def test_a_second_writer_gets_one_line_and_a_dead_ones_lock_is_taken_over(tmp_path):
    lock = tmp_path / ".cpu-ort.lock"
    with exclusive(lock, "build/cpu-ort"):
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(ef.EdgefuseError, match=f"another edgefuse process \\(pid {os.getpid()}\\) is writing"):
            with exclusive(lock, "build/cpu-ort"):
                pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout)
    with exclusive(lock, "build/cpu-ort"):
        assert lock.read_text().split()[0] == str(os.getpid())


def test_a_lock_whose_pid_another_process_now_has_is_taken_over(tmp_path):
    """After a restart the recorded pid may belong to an unrelated process: its start time tells them apart."""
    lock = tmp_path / ".cpu-ort.lock"
    pid, start, boot = (f"{os.getpid()} 1 " + Path("/proc/sys/kernel/random/boot_id").read_text().strip()).split()
    lock.write_text(f"{os.getppid()} {start} {boot}\n")  # a live pid, but not the process that took the lock
    with exclusive(lock, "build/cpu-ort"):
        assert lock.read_text().split()[0] == str(os.getpid())


def test_a_lock_path_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / ".cpu-ort.lock").mkdir()
    with pytest.raises(ef.EdgefuseError, match="is a folder where edgefuse keeps the lock"):
        with exclusive(tmp_path / ".cpu-ort.lock", "build/cpu-ort"):
            pass


def test_publish_replaces_folders_whole_and_keeps_what_it_does_not_own(tmp_path):
    dest, stage = tmp_path / "out", tmp_path / "stage"
    (dest / "candidates").mkdir(parents=True)
    (dest / "candidates" / "old.onnx").write_text("earlier export")
    (dest / "sweep").mkdir()
    (dest / "sweep" / "sweep.json").write_text("{}")
    (stage / "candidates").mkdir(parents=True)
    (stage / "candidates" / "new.onnx").write_text("this export")
    (stage / "model.onnx").write_text("model")
    publish(stage, dest)
    assert snapshot(dest).keys() == {"candidates/new.onnx", "model.onnx", "sweep/sweep.json"}
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def test_publish_removes_an_earlier_runs_output_that_this_run_does_not_write(tmp_path):
    dest, stage = tmp_path / "out", tmp_path / "stage"
    (dest / "cascade").mkdir(parents=True)
    (dest / "cascade" / "cascade.json").write_text("{}")  # an earlier export shipped a cascade
    (dest / "notes.txt").write_text("the user's")
    stage.mkdir()
    (stage / "model.onnx").write_text("a member")
    publish(stage, dest, outputs=("model.onnx", "cascade"))
    assert snapshot(dest).keys() == {"model.onnx", "notes.txt"}


def test_export_cleans_a_killed_runs_staging_and_reports_published_files(tmp_path, monkeypatch, cnns):
    monkeypatch.chdir(tmp_path)
    for i, m in enumerate(cnns[:2]):
        save_file(m.state_dict(), tmp_path / f"m{i}.safetensors")
    stale = tmp_path / "b" / ".cpu-ort-staging-killed"
    (stale / "candidates").mkdir(parents=True)
    (stale / "candidates" / "x.onnx").write_bytes(b"half written")
    (tmp_path / "b" / "cpu-ort" / "candidates").mkdir(parents=True)
    (tmp_path / "b" / "cpu-ort" / "candidates" / "from-an-earlier-export.onnx").write_bytes(b"old")
    res = CliRunner().invoke(cli, ["-q", "export", "--model", CNN, "m0.safetensors", "m1.safetensors", "--dataset",
                                   "digits", "--out-root", "b", "--depth", "1", "--force"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["cpu-ort"]  # no staging folder, no lock
    out = tmp_path / "b" / "cpu-ort"
    assert not (out / "candidates" / "from-an-earlier-export.onnx").exists()
    import json
    report = json.loads((out / "report.json").read_text())
    assert all((out / c["file"]).is_file() for c in report["candidates"] if c["file"])


@pytest.mark.parametrize("line,message", [
    ("opset = 99", "opset must be an integer from 9 to 23, got 99"),
    ("opset = 5", "opset must be an integer from 9 to 23, got 5"),
    ("batch_sizes = [1000000000]", "batch_sizes must be a non-empty list of integers from 1 to 65536"),
    ("batch_sizes = 32", "batch_sizes must be a non-empty list"),
    ('threads = "two"', "threads must be an integer from 1 to 256, got 'two'"),
    ("threads = 0", "threads must be an integer from 1 to 256"),
    ('max_macs_ratio = "abc"', "max_macs_ratio must be a number"),
    ("max_macs_ratio = nan", "max_macs_ratio must be a number"),
    ("latency_budget_ms = -1.0", "latency_budget_ms must be a positive number of milliseconds"),
    ("batch_heads = 1", "batch_heads must be true or false"),
    ("distill_steps = true", "distill_steps must be an integer"),
])
def test_target_values_are_checked_by_type_and_range(line, message):
    with pytest.raises(ef.EdgefuseError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_target("t", f'runtime = "onnxruntime"\ndevice = "cpu"\n{line}\n', "t.toml")


def test_an_output_folder_under_a_file_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    before = snapshot(tmp_path)
    res = CliRunner().invoke(cli, ["-q", "export", "--out-root", "afile/build"])
    assert res.exit_code == 1 and "afile is a file, not a folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and snapshot(tmp_path) == before


def _raises():
    raise RuntimeError("no GPU here")


def _none():
    return None


@pytest.mark.parametrize("factory,message", [
    ("tests.test_hostile:_raises", "failed: RuntimeError: no GPU here"),
    ("tests.test_hostile:_none", "returned NoneType, not a torch.nn.Module"),
])
def test_a_broken_model_factory_is_the_users_error(cnns, tmp_path, factory, message):
    save_file(cnns[0].state_dict(), tmp_path / "a.safetensors")
    with pytest.raises(ef.EdgefuseError, match=message):
        ef.load_models(factory, [tmp_path / "a.safetensors"])


def test_checkpoints_of_the_wrong_kind_are_named(cnns, tmp_path):
    ints = {k: v.to(torch.int64) if v.is_floating_point() else v for k, v in cnns[0].state_dict().items()}
    save_file(ints, tmp_path / "ints.safetensors")
    with pytest.raises(ef.EdgefuseError, match="holds int64 values where the model has float32 weights"):
        ef.load_models(CNN, [tmp_path / "ints.safetensors"])
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(ef.EdgefuseError, match="is a folder, not a checkpoint file"):
        ef.load_models(CNN, [tmp_path / "folder.pt"])


def test_members_must_agree_on_dtype_and_have_weights(cnns):
    spec = ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8))
    with pytest.raises(ef.EdgefuseError, match="model 1 has weights of type/device .*float64"):
        ef.fuse([cnns[0], copy.deepcopy(cnns[1]).double()], spec, depth=1, data=[torch.rand(8, 1, 8, 8)])
    with pytest.raises(ef.EdgefuseError, match="meta device"):
        ef.fuse([cnns[0], copy.deepcopy(cnns[1]).to("meta")], spec, depth=1, data=[torch.rand(8, 1, 8, 8)])
    from edgefuse.models import zoo
    from tests import nets
    wide = nets.randomize_bn(zoo.cnn(width=8, image=8), 0).eval()
    with pytest.raises(ef.EdgefuseError, match="different architecture"):
        ef.ensemble([cnns[0], wide], batched=True)
    with pytest.raises(ef.EdgefuseError, match="named by strings"):
        ef.fuse(cnns, spec, alpha={1: 0.5}, data=[torch.rand(8, 1, 8, 8)])


def test_damaged_dataset_files_are_blamed_on_the_data(tmp_path, monkeypatch):
    import gzip

    from edgefuse.models import data
    monkeypatch.setattr(data, "FASHION_DIRS", (str(tmp_path),))
    for name in data.FASHION_FILES:
        (tmp_path / name).write_bytes(gzip.compress(b""))
    with pytest.raises(ef.EdgefuseError, match="is not an IDX file"):
        data.fashion_mnist("test")
    images = np.zeros((3, 2, 2), np.uint8)
    header = b"\0\0\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + (2).to_bytes(4, "big")
                                                                       + b"\0\1"))
    with pytest.raises(ef.EdgefuseError, match="3 images but 2 labels"):
        data.fashion_mnist("test")


@pytest.mark.parametrize("kw", [{"latency_ms": float("nan")}, {"memory_mb": float("inf")}, {"max_drop": -0.1},
                                {"latency_ms": (1.0, float("nan"))}])
def test_budgets_must_be_finite(kw):
    from edgefuse.run.choose import target_budget
    from edgefuse.targets import load_target
    with pytest.raises(ef.EdgefuseError, match="must be a finite number"):
        target_budget(load_target("cpu-ort"), **kw)


def test_file_names_that_are_not_utf8_load_and_write(cnns, tmp_path):
    if sys.platform != "linux":
        pytest.skip("byte-string file names are a POSIX filesystem's")
    folder = os.fsdecode(bytes(tmp_path) + b"/\xfe")
    os.mkdir(folder)
    ckpts = []
    for i, m in enumerate(cnns[:2]):
        ckpts.append(os.path.join(folder, f"m{i}.safetensors"))
        save_file(m.state_dict(), ckpts[-1])
    out = os.path.join(folder, "\udcff.onnx")
    res = CliRunner().invoke(cli, ["-q", "fuse", "--model", CNN, *ckpts, "--dataset", "digits", "--depth", "1",
                                   "-o", out])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["-q", "verify", out, "--dataset", "digits"])
    assert res.exit_code == 0, res.output


def test_a_failed_legacy_export_prints_nothing_on_stdout(cnns, tmp_path, capfd):
    class Unflatten(torch.nn.Module):  # aten::unflatten has no ONNX form before opset 13
        def forward(self, x):
            return x.unflatten(1, (1, -1))

    with pytest.raises(ef.EdgefuseError, match="ONNX export failed"):
        ef.export_onnx(Unflatten(), torch.rand(2, 4), tmp_path / "m.onnx", opset=9)
    assert capfd.readouterr().out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batches,message", [
    ([torch.rand(4, 3, 5)], r"inputs of shape \(3, 5\) do not fit the model"),
    ([torch.rand(4, 1, 8, 8), torch.rand(4, 1, 4, 4)], "calibration batches of different shapes"),
])
def test_calibration_data_of_the_wrong_shape_is_named(cnns, batches, message):
    spec = ef.permutation_spec(cnns[0], torch.rand(2, 1, 8, 8))
    states = [copy.deepcopy(m.state_dict()) for m in cnns]
    with pytest.raises(ef.EdgefuseError, match=message):
        ef.fuse(cnns, spec, depth=1, data=batches)
    with pytest.raises(ef.EdgefuseError, match=message):
        ef.align(cnns, spec, "activation", data=batches)
    assert all(all(torch.equal(v, s[k]) for k, v in m.state_dict().items()) for m, s in zip(cnns, states))


def test_one_line_errors_survive_empty_and_long_messages():
    from edgefuse.base.errors import first_line
    assert first_line(RuntimeError("\n  shapes differ\nstack...\n")) == "shapes differ"
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError("  \n ")) == "ValueError"


def test_a_data_folder_in_the_environment_that_points_nowhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFUSE_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(ef.EdgefuseError, match="EDGEFUSE_FASHION_MNIST=.*holds no Fashion-MNIST files"):
        ef.load_data("fashion-mnist")


def test_a_targets_folder_in_the_environment_that_points_nowhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEFUSE_TARGETS", str(tmp_path / "nowhere"))
    res = CliRunner().invoke(cli, ["-q", "export", "--target", "cpu-ort"])
    assert res.exit_code == 1 and "EDGEFUSE_TARGETS=" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_export_into_its_own_data_folder_is_refused_and_deletes_nothing(tmp_path, monkeypatch, cnns):
    """The probe's layout: --out-root at an ImageFolder, a target named like its split, a class named candidates."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    for i, m in enumerate(cnns[:2]):
        save_file(m.state_dict(), tmp_path / f"m{i}.safetensors")
    images = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("candidates", "other"):
            (images / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.new("L", (8, 8), 40 * k).save(images / split / cls / f"{k}.png")
    shutil.copy(load_target("cpu-ort").source, tmp_path / "train.toml")
    before = snapshot(images)
    res = CliRunner().invoke(cli, ["-q", "export", "--model", CNN, "m0.safetensors", "m1.safetensors", "--data",
                                   str(images), "--target", "train.toml", "--out-root", str(images), "--force"])
    assert res.exit_code == 1 and "overlaps the data it reads" in res.stderr, res.output
    assert snapshot(images) == before


def test_an_export_refuses_a_folder_it_did_not_write_unless_forced(tmp_path, monkeypatch, cnns):
    monkeypatch.chdir(tmp_path)
    for i, m in enumerate(cnns[:2]):
        save_file(m.state_dict(), tmp_path / f"m{i}.safetensors")
    (tmp_path / "b" / "cpu-ort" / "candidates").mkdir(parents=True)
    (tmp_path / "b" / "cpu-ort" / "candidates" / "holiday.jpg").write_bytes(b"a photo")
    (tmp_path / "b" / "cpu-ort" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "b")
    args = ["-q", "export", "--model", CNN, "m0.safetensors", "m1.safetensors", "--dataset", "digits",
            "--out-root", "b", "--depth", "1"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "not an edgefuse export (candidates, notes.txt)" in res.stderr, res.output
    assert snapshot(tmp_path / "b") == before


def test_an_export_of_a_network_without_batchnorm_warns_about_nothing(mlp_checkpoints, tmp_path, monkeypatch):
    from edgefuse.base import errors

    monkeypatch.setattr(errors, "_WARNED", set())  # a warning said earlier in this process would not show again
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.nets:digits_mlp", *mlp_checkpoints[:2],
                                   "--dataset", "digits", "--out-root", "b", "--depth", "1"])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.stderr, res.stderr
