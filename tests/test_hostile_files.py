"""Hostile surroundings: an output folder that cannot be written, a disk that is full or fills late, image folders
whose odd files must be named, and `verify` of a graph whose outputs do not match the data."""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import edgefuse as ef
from edgefuse.base import files
from edgefuse.cli import cli
from edgefuse.models.fit import check_fit
from edgefuse.models.sources import load_data

from .test_bad_input import CNN, snapshot


def _earlier_export(out):
    """What an export leaves, as _claim recognises it."""
    (out / "candidates").mkdir(parents=True)
    (out / "candidates" / "member0.onnx").write_bytes(b"an earlier graph")
    (out / "model.onnx").write_bytes(b"the earlier choice")
    (out / "report.json").write_text(json.dumps({"target": "cpu-ort", "shipped": {}, "candidates": []}))


@pytest.fixture()
def checkpoints(tmp_path, monkeypatch, cnns):
    monkeypatch.chdir(tmp_path)
    for i, m in enumerate(cnns[:2]):
        save_file(m.state_dict(), tmp_path / f"m{i}.safetensors")
    return ["--model", CNN, "m0.safetensors", "m1.safetensors", "--dataset", "digits", "--out-root", "b"]


def _one_line(res, text):
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and text in lines[0], res.output


def test_an_output_folder_that_cannot_be_replaced_fails_before_any_work(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "b" / "cpu-ort"
    _earlier_export(out)
    (out / "candidates").chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: deny as the file system would deny a user
        real = os.access
        monkeypatch.setattr(files.os, "access", lambda p, m: False if str(p).endswith("candidates") else real(p, m))
    before = snapshot(tmp_path / "b")
    res = CliRunner().invoke(cli, ["-q", "export", *checkpoints, "--depth", "1", "--force"])
    (out / "candidates").chmod(0o755)
    _one_line(res, "cannot replace b/cpu-ort/candidates: it is not writable")
    assert snapshot(tmp_path / "b") == before


def test_a_disk_without_room_is_refused_before_any_work(checkpoints, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: measured.append(p) or
                        type("Usage", (), {"free": 3_000_000})())
    monkeypatch.setattr("edgefuse.jobs.export.measure_field", lambda *a: pytest.fail("measured without room"))
    res = CliRunner().invoke(cli, ["-q", "export", *checkpoints, "--depth", "1"])
    _one_line(res, "MB free")
    assert "needs about" in res.stderr and measured and not (tmp_path / "b" / "cpu-ort").exists()


def test_a_disk_that_fills_late_is_one_line_and_keeps_the_earlier_export(checkpoints, tmp_path):
    """A file-size limit makes the first large write fail midway, as a disk that fills up does."""
    out = tmp_path / "b" / "cpu-ort"
    _earlier_export(out)
    before = snapshot(tmp_path / "b")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    cli_main = "from edgefuse.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", cli_main, "-q", "export", *checkpoints, "--depth", "1", "--force"],
                         capture_output=True, text=True, preexec_fn=limit, env=env, timeout=600)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], res.stderr
    assert snapshot(tmp_path / "b") == before
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["cpu-ort"]  # no staging folder left


def _folder(root, colour=None, animated=None):
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(6):
                Image.new("L", (8, 8), 20 * k + (c == "b") * 100).save(root / split / c / f"{k}.png")
    if colour:
        Image.new("CMYK", (8, 8), (0, 0, 0, 40)).save(root / colour)
    if animated:
        frames = [Image.new("L", (8, 8), v) for v in (0, 128)]
        frames[0].save(root / animated, save_all=True, append_images=frames[1:])


def test_a_colour_image_among_grey_ones_is_named_when_the_splits_disagree(tmp_path):
    _folder(tmp_path, colour="train/a/cmyk.jpg")
    with pytest.raises(ef.EdgefuseError, match=r"train 3x8x8, test 1x8x8 \(.*cmyk.jpg is CMYK among greyscale"):
        load_data(str(tmp_path))


def test_a_colour_image_among_grey_ones_is_named_where_the_model_refuses_it(tmp_path, cnns):
    _folder(tmp_path, colour="train/a/cmyk.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "a" / "rgb.png")
    splits = load_data(str(tmp_path))
    assert splits.input_shape == (3, 8, 8)
    with pytest.raises(ef.EdgefuseError, match="does not take the inputs.*cmyk.jpg is CMYK among greyscale images"):
        check_fit(cnns[0], splits)


def test_an_animated_image_is_refused_by_name(tmp_path):
    _folder(tmp_path, animated="test/b/moving.gif")
    with pytest.raises(ef.EdgefuseError, match=r"moving.gif is animated \(2 frames\)"):
        load_data(str(tmp_path))


def test_verify_checks_a_graphs_outputs_against_the_datas_classes(tmp_path, monkeypatch, cnns):
    """A 10-output graph on a 2-class folder: every label fits, but the classes do not; named in one line."""
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data")
    ef.export_onnx(cnns[0], torch.rand(2, 1, 8, 8), tmp_path / "digits.onnx")
    res = CliRunner().invoke(cli, ["-q", "verify", "digits.onnx", "--data", "data"])
    _one_line(res, "data has 2 classes but digits.onnx has 10 outputs")


def test_an_output_folder_linked_to_another_filesystem_is_staged_there(checkpoints, tmp_path):
    """OUT_ROOT/TARGET as a symlink to another disk: staged beside where the files end up, so publishing renames."""
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) beside the test folder")
    elsewhere = tempfile.mkdtemp(dir="/dev/shm", prefix="edgefuse-test-")
    try:
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "cpu-ort").symlink_to(elsewhere)
        res = CliRunner().invoke(cli, ["-q", "export", *checkpoints, "--depth", "1"])
        assert res.exit_code == 0, res.output
        assert {"model.onnx", "report.json", "candidates"} <= set(os.listdir(elsewhere))
        assert sorted(os.listdir(tmp_path / "b")) == ["cpu-ort"] and (tmp_path / "b" / "cpu-ort").is_symlink()
    finally:
        shutil.rmtree(elsewhere)
