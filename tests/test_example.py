"""examples/own_data end to end on a small size: the user's own network, checkpoints (.pt and safetensors) and
ImageFolder; the shipped model.onnx, re-measured here without edgefuse, scores what the report says, and the same
images as an .npz give `edgefuse verify` the same accuracy."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner
from PIL import Image

from edgefuse.cli import cli
from edgefuse.targets import load_target

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_data"


def read_folder(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ImageFolder convention, written out again: sorted class folders, label = index, RGB in [0, 1]."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, c in enumerate(classes):
        for f in sorted((split_dir / c).iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def test_the_worked_example_ships_a_model_for_the_users_own_images(tmp_path, monkeypatch):
    for f in EXAMPLE.glob("*.py"):
        shutil.copy(f, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    subprocess.run([sys.executable, "make_images.py", "images", "--per-class", "24"], check=True)
    subprocess.run([sys.executable, "train.py", "images", "--epochs", "6"], check=True, capture_output=True)
    ckpts = sorted(str(p) for p in (tmp_path / "checkpoints").iterdir())
    assert [Path(c).suffix for c in ckpts] == [".pt", ".pt", ".safetensors"]
    target = Path(load_target("cpu-ort").source).read_text() + "\ndistill_steps = 20\n"
    (tmp_path / "quick.toml").write_text(target)
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "mynet:make_net", *ckpts, "--data", "images",
                                   "--target", "quick.toml", "--out-root", "build"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "build" / "quick"
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [3, 32, 32] and report["classes"] == ["four", "one", "three", "two", "zero"]
    assert report["data_source"] == "images" and "hold-out" in report["validation_data"]
    shipped = next(c for c in report["candidates"] if c["key"] == report["shipped"]["key"])

    x, y = read_folder(tmp_path / "images" / "test")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert logits.shape == (len(y), 5)
    accuracy = float((logits.argmax(1) == y).mean())
    assert abs(accuracy - shipped["test"]["accuracy"]) < 1e-9

    xt, yt = read_folder(tmp_path / "images" / "train")
    np.savez(tmp_path / "images.npz", x_train=xt, y_train=yt, x_test=x, y_test=y)
    res = CliRunner().invoke(cli, ["-q", "verify", str(out / "model.onnx"), "--data", "images.npz"])
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout)["accuracy"] - accuracy) < 1e-9


FINETUNE = Path(__file__).resolve().parents[1] / "examples" / "finetune"


def test_the_fine_tune_example_merges_against_the_users_pretrained_checkpoint(tmp_path, monkeypatch):
    """examples/finetune on a small size: a pretrained checkpoint, four fine-tunes with new heads, an export with
    --base; the regime is said, merges are measured, and what ships runs as the report says."""
    for f in FINETUNE.glob("*.py"):
        shutil.copy(f, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    subprocess.run([sys.executable, "make_images.py", "--per-class", "30"], check=True, capture_output=True)
    subprocess.run([sys.executable, "pretrain.py", "--epochs", "4"], check=True, capture_output=True)
    subprocess.run([sys.executable, "train.py", "--epochs", "3"], check=True, capture_output=True)
    target = Path(load_target("cpu-ort").source).read_text() + "\ndistill_steps = 20\n"
    (tmp_path / "quick.toml").write_text(target)
    ckpts = sorted(str(p) for p in (tmp_path / "checkpoints").iterdir())
    # --depth 3 ships the full merge (lsq re-solves the heads the members initialised apart) and skips the other
    # depths and alphas, whose choice the worked example above already covers; merges and cascades are measured
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "mynet:make_net", *ckpts, "--base",
                                   "pretrained.safetensors", "--data", "images", "--target", "quick.toml",
                                   "--out-root", "build", "--depth", "3"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "build" / "quick"
    report = json.loads((out / "report.json").read_text())
    assert report["regime"]["name"] == "fine-tunes" and report["classes"] == ["eight", "five", "nine", "seven", "six"]
    assert {c["merge"]["method"] for c in report["candidates"] if c["kind"] == "merge"} >= {"task-arithmetic", "ties"}
    shipped = next(c for c in report["candidates"] if c["key"] == report["shipped"]["key"])
    x, y = read_folder(tmp_path / "images" / "test")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert abs(float((logits.argmax(1) == y).mean()) - shipped["test"]["accuracy"]) < 1e-9
