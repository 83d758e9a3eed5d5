"""The user's own data: ImageFolder, .npz and loader hooks give the splits the pipeline uses; bad data is one line."""
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import edgefuse as ef
from edgefuse.cli import cli
from edgefuse.models import data
from edgefuse.models.images import ImageFiles

from .test_bad_input import CNN, fails

X, Y = data.digits()


def write_folder(root, split_counts=(("train", 120), ("test", 40)), mode="L", size=8, suffix=".png"):
    """Digits as image files in the ImageFolder layout, classes named so that sorting changes their order."""
    names = [f"c{d:02d}" for d in range(10)]
    start = 0
    for split, n in split_counts:
        for i in range(start, start + n):
            img = Image.fromarray((X[i, 0].numpy() * 255).round().astype(np.uint8), "L")
            img = img.resize((size, size)) if size != 8 else img
            folder = root / split / names[int(Y[i])]
            folder.mkdir(parents=True, exist_ok=True)
            img.convert(mode).save(folder / f"{i}{suffix}")
        start += n
    return root


@pytest.fixture()
def work(tmp_path, monkeypatch, cnns):
    monkeypatch.chdir(tmp_path)
    for i, m in enumerate(cnns[:2]):
        save_file(m.state_dict(), tmp_path / f"m{i}.safetensors")
    return tmp_path


def fuse_on(source):
    return ["fuse", "--model", CNN, "m0.safetensors", "m1.safetensors", "--data", str(source), "--depth", "1",
            "-o", "new.onnx"]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_an_image_folder_gives_sorted_classes_channels_first_and_a_seeded_holdout(tmp_path, suffix):
    root = write_folder(tmp_path / "imgs", suffix=suffix)
    s = ef.load_data(str(root))
    assert s.classes == tuple(f"c{d:02d}" for d in range(10))
    assert isinstance(s.x_train, ImageFiles) and s.x_train.shape[1:] == (1, 8, 8) == s.input_shape
    assert len(s.x_train) + len(s.x_val) == 120 and len(s.x_test) == 40 and len(s.x_val) == 12
    assert s.x_val.dtype == torch.float32 and 0 <= s.x_val.min() and s.x_val.max() <= 1
    # Labels are class indices; the decoded pixels are the digits' (lossless formats exactly).
    test_files = sorted((root / "test").rglob(f"*{suffix}"))
    assert s.y_test.tolist() == [int(f.parent.name[1:]) for f in test_files]
    if suffix != ".jpg":
        assert torch.allclose(s.x_test, X[120:160][torch.tensor([int(f.stem) - 120 for f in test_files])],
                              atol=1 / 255)
    again = ef.load_data(str(root))
    assert torch.equal(again.x_val, s.x_val) and again.x_train.files == s.x_train.files
    assert "hold-out" in s.origins[1] and str(root) in s.origins[2]


def test_sixteen_bit_and_float_images_read_the_pixels_of_their_8_bit_twins(tmp_path):
    eight = ef.load_data(str(write_folder(tmp_path / "u8")))
    root = write_folder(tmp_path / "u16")
    for f in root.rglob("*.png"):  # each file again as a 16-bit PNG of the same picture
        a = np.asarray(Image.open(f), dtype=np.uint16) * 257
        Image.fromarray(a).save(f)
    assert Image.open(next(root.rglob("*.png"))).mode == "I;16"
    wide = ef.load_data(str(root))
    assert torch.allclose(wide.x_test, eight.x_test, atol=1 / 255) and wide.x_test.max() > 0.5
    one = next(root.rglob("*.png"))
    Image.fromarray(np.asarray(Image.open(one), dtype=np.float32) / 65535).save(one.with_suffix(".tif"))
    one.unlink()
    floats = ef.load_data(str(root))
    assert torch.allclose(floats.x_test, eight.x_test, atol=1 / 255)


@pytest.mark.parametrize("pixels, message", [
    (np.full((8, 8), 70000, np.int32), "32-bit integer pixels"),
    (np.full((8, 8), 3.0, np.float32), "float pixels outside"),
])
def test_images_whose_range_cannot_be_known_are_refused_by_name(tmp_path, pixels, message):
    root = write_folder(tmp_path / "imgs")
    bad = next((root / "test").rglob("*.png"))
    Image.fromarray(pixels).save(bad.with_suffix(".tif"))
    bad.unlink()
    with pytest.raises(ef.EdgefuseError, match=message) as e:
        ef.load_data(str(root)).x_test
    assert bad.stem in str(e.value)


def test_colour_images_give_three_channels_and_a_val_folder_is_used(tmp_path):
    root = write_folder(tmp_path / "rgb", (("train", 60), ("val", 20), ("test", 20)), mode="RGB", size=12)
    s = ef.load_data(str(root), None)
    assert s.input_shape == (3, 12, 12) and len(s.x_val) == 20 and len(s.x_train) == 60
    assert s.x_train[torch.tensor([0, 5])].shape == (2, 3, 12, 12)
    assert "val" in s.origins[1]


def test_an_npz_and_a_loader_hook_give_the_same_splits(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", x_train=(X[:100].numpy() * 255).astype(np.uint8), y_train=Y[:100].numpy(),
             x_test=X[100:150].numpy(), y_test=Y[100:150].numpy())
    s = ef.load_data(str(tmp_path / "d.npz"), val_size=20)
    assert len(s.x_train) == 80 and len(s.x_val) == 20 and s.x_train.dtype == torch.float32
    assert torch.allclose(s.x_test, X[100:150]) and s.x_train.max() <= 1
    (tmp_path / "myloader.py").write_text(
        "import torch\nfrom edgefuse.models import data\n"
        "def splits():\n    x, y = data.digits()\n"
        "    return {'x_train': torch.utils.data.TensorDataset(x[:100], y[:100]),\n"
        "            'x_test': torch.utils.data.TensorDataset(x[100:150], y[100:150])}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "myloader", raising=False)
    h = ef.load_data("myloader:splits", val_size=20)
    assert torch.equal(h.y_test, s.y_test) and torch.allclose(h.x_test, s.x_test)
    assert torch.equal(h.y_val, s.y_val) and torch.allclose(h.x_val, s.x_val, atol=1 / 255)
    assert h.x_train[torch.tensor([3, 4])].shape == (2, 1, 8, 8)


def test_unlabeled_training_inputs_need_a_validation_split(tmp_path):
    np.savez(tmp_path / "u.npz", x_train=X[:50].numpy(), x_val=X[50:80].numpy(), y_val=Y[50:80].numpy(),
             x_test=X[80:100].numpy(), y_test=Y[80:100].numpy())
    s = ef.load_data(str(tmp_path / "u.npz"))
    assert s.y_train is None and len(s.x_val) == 30
    np.savez(tmp_path / "v.npz", x_train=X[:50].numpy(), x_test=X[80:100].numpy(), y_test=Y[80:100].numpy())
    with pytest.raises(ef.EdgefuseError, match="needs labels"):
        ef.load_data(str(tmp_path / "v.npz"))


def test_fuse_runs_on_a_folder_of_the_models_shape(work):
    write_folder(work / "imgs")
    res = CliRunner().invoke(cli, ["-q", *fuse_on(work / "imgs")])
    assert res.exit_code == 0, res.output
    assert (work / "new.onnx").is_file()


def _sizes(root):
    write_folder(root)
    Image.new("L", (9, 8)).save(root / "train" / "c03" / "odd.png")


def _unreadable(root):
    write_folder(root)
    (root / "test" / "c01" / "bad.png").write_bytes(b"not an image at all")


def _truncated(root):
    write_folder(root)
    f = next((root / "test" / "c02").glob("*.png"))
    big = root / "test" / "c02" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8), "L").save(big)
    big.write_bytes(big.read_bytes()[:60])
    assert f.is_file()


def _empty_class(root):
    write_folder(root)
    (root / "train" / "c99").mkdir()


def _extra_test_class(root):
    write_folder(root)
    (root / "test" / "zz").mkdir()
    Image.new("L", (8, 8)).save(root / "test" / "zz" / "a.png")


def _wrong_classes(root):
    write_folder(root)
    for f in (root / "train" / "c09").iterdir():
        f.unlink()
    (root / "train" / "c09").rmdir()
    for f in (root / "test" / "c09").iterdir():
        f.unlink()
    (root / "test" / "c09").rmdir()


def _wrong_shape(root):
    write_folder(root, mode="RGB", size=16)


@pytest.mark.parametrize("make, message", [
    (_sizes, "images of different sizes"),
    (_unreadable, "bad.png"),
    (_truncated, "big.png"),
    (_empty_class, "c99 holds no image"),
    (_extra_test_class, "class 'zz' that"),
    (_wrong_classes, "9 classes but the model has 10 outputs"),
    (_wrong_shape, "the model does not take the inputs"),
])
def test_bad_image_folders_are_one_line(work, make, message):
    make(work / "imgs")
    fails(work, fuse_on(work / "imgs"), message)


def test_different_sizes_name_two_files(work):
    _sizes(work / "imgs")
    res = fails(work, fuse_on(work / "imgs"), "odd.png")
    assert res.stderr.count(".png") == 2


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=X[:50], x_test=X[50:80]), "missing 'y_test'"),
    (dict(y_train=Y[:50], x_test=X[50:80], y_test=Y[50:80]), "missing 'x_train'"),
    (dict(x_train=X[:50], y_train=Y[:40], x_test=X[50:80], y_test=Y[50:80]), "'y_train' has 40 labels"),
    (dict(x_train=X[:50], y_train=Y[:50], x_test=X[50:80], y_test=Y[50:80] + 5), "label 14 is outside"),
    (dict(x_train=X[:50], y_train=Y[:50], x_test=X[50:80], y_test=Y[50:80], z=Y[:3]), "unknown key 'z'"),
    (dict(x_train=X[:50] * 255, y_train=Y[:50], x_test=(X[50:80] * 255).to(torch.uint8), y_test=Y[50:80]),
     "'x_train' reaches 255 while 'x_test' stays within 1"),
    (dict(x_train=X[:50], y_train=Y[:50] + 0.7, x_test=X[50:80], y_test=Y[50:80]), "not a whole number (0.7"),
    (dict(x_train=X[:50], y_train=np.array(["cat"] * 50), x_test=X[50:80], y_test=Y[50:80]),
     "got strings of shape (50,) (first: 'cat')"),
])
def test_bad_npz_files_are_one_line(work, arrays, message):
    np.savez(work / "d.npz", **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()})
    fails(work, fuse_on("d.npz"), message)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64, np.int8])
def test_labels_of_any_integer_dtype_read_as_class_indices(tmp_path, dtype):
    np.savez(tmp_path / "d.npz", x_train=X[:60].numpy(), y_train=Y[:60].numpy().astype(dtype),
             x_test=X[60:90].numpy(), y_test=Y[60:90].numpy().astype(dtype))
    s = ef.load_data(str(tmp_path / "d.npz"))
    assert s.y_test.dtype == torch.int64 and s.y_test.tolist() == Y[60:90].tolist()


def test_a_dataset_of_uint8_images_reads_on_the_scale_of_uint8_arrays(tmp_path, monkeypatch):
    (tmp_path / "u8hook.py").write_text(
        "import numpy as np, torch\n"
        "from edgefuse.models import data\n"
        "X, Y = data.digits()\n"
        "class Images(torch.utils.data.Dataset):\n"
        "    def __init__(self, a, b): self.a, self.b = a, b\n"
        "    def __len__(self): return self.b - self.a\n"
        "    def __getitem__(self, i):\n"
        "        return (X[self.a + i].numpy() * 255).round().astype(np.uint8), float(Y[self.a + i])\n"
        "def load():\n"
        "    return {'x_train': Images(0, 60), 'x_test': Images(60, 90)}\n"
        "def arrays():\n"
        "    u8 = (X[:90].numpy() * 255).round().astype(np.uint8)\n"
        "    return {'x_train': u8[:60], 'y_train': Y[:60], 'x_test': u8[60:90], 'y_test': Y[60:90]}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hooked, arrays = ef.load_data("u8hook:load"), ef.load_data("u8hook:arrays")
    assert torch.equal(hooked.x_test, arrays.x_test) and hooked.x_test.max() <= 1
    assert torch.equal(hooked.y_test, arrays.y_test)


def test_a_damaged_npz_is_one_line(work):
    (work / "d.npz").write_bytes(b"PK\x03\x04 truncated")
    fails(work, fuse_on("d.npz"), "cannot read d.npz as .npz")


@pytest.mark.parametrize("body, message", [
    ("def load():\n    raise ValueError('no such bucket')\n", "raised ValueError: no such bucket"),
    ("def load():\n    return [1, 2]\n", "returned list, expected a mapping"),
    ("import nonexistent_pkg\ndef load():\n    pass\n", "cannot import data loader"),
    ("def other():\n    pass\n", "cannot import data loader 'hook:load'"),
    ("import sys\ndef load():\n    sys.exit(0)\n", "exited (SystemExit(0)) instead of returning"),
    ("raise SystemExit(0)\ndef load():\n    pass\n", "exited (SystemExit(0))"),
])
def test_bad_loader_hooks_are_one_line(work, body, message, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, "hook", raising=False)
    (work / "hook.py").write_text(body)
    fails(work, fuse_on("hook:load"), message)


def test_an_unknown_source_says_what_sources_are(work):
    fails(work, fuse_on("no-such-thing"), "is not a built-in set")


def test_calibration_images_sets_how_many_training_images_calibrate(cnn_checkpoints, tmp_path):
    import json

    from click.testing import CliRunner

    from edgefuse.cli import cli
    from edgefuse.models.data import load_dataset
    from dataclasses import replace

    splits = load_dataset("digits")
    assert len(replace(splits, calibration_images=100).calib) == 100
    assert len(replace(splits, calibration_images=0).calib) == len(splits.x_train)  # 0: all of them
    assert replace(splits, calibration_images=100).digest != splits.digest  # stored results tell them apart
    res = CliRunner().invoke(cli, ["-q", "export", "--model", "tests.nets:digits_cnn", *cnn_checkpoints,
                                   "--dataset", "digits", "--depth", "1",
                                   "--calibration-images", "150", "--out-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cpu-ort" / "report.json").read_text())["calibration_images"] == 150


def test_a_hook_that_prints_cannot_break_verifys_json(work, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.delitem(sys.modules, "chatty", raising=False)
    np.savez(work / "d.npz", x_train=X[:60].numpy(), y_train=Y[:60].numpy(), x_test=X[60:90].numpy(),
             y_test=Y[60:90].numpy())
    (work / "chatty.py").write_text("import numpy as np\nprint('loading...')\n"
                                    "def load():\n    print('half way')\n    return dict(np.load('d.npz'))\n")
    assert CliRunner().invoke(cli, ["-q", *fuse_on(work / "d.npz")]).exit_code == 0
    res = CliRunner().invoke(cli, ["-q", "verify", "new.onnx", "--data", "chatty:load"])
    assert res.exit_code == 0, res.output
    import json
    assert json.loads(res.stdout)["accuracy"] > 0.5 and "half way" in res.stderr

