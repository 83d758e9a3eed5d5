"""Datasets that exist on this machine without a download: Fashion-MNIST (Debian package) and sklearn digits."""
from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..base.errors import EdgefuseError, first_line
from ..base.hooks import optional

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
# build/data/fashion-mnist: where a machine without the Debian package (the lent GPU machine) gets a copy.
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "build/data/fashion-mnist")
VALIDATION_IMAGES = 5000  # held out of Fashion-MNIST's 60,000 training images: the chooser's data
CALIBRATION_IMAGES = 2000  # alignment, BatchNorm reset and REPAIR statistics, from the training part
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def fashion_mnist_dir() -> Path:
    """The folder with the four IDX files, or a one-line error saying how to get them. A folder named by
    EDGEFUSE_FASHION_MNIST must hold them: a setting that points nowhere is an error, never a silent fallback."""
    env = os.environ.get("EDGEFUSE_FASHION_MNIST")
    if env:
        if (Path(env) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(env)
        raise EdgefuseError(f"EDGEFUSE_FASHION_MNIST={env} holds no Fashion-MNIST files ({', '.join(FASHION_FILES)})")
    for d in FASHION_DIRS:
        if d and (Path(d) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(d)
    raise EdgefuseError("Fashion-MNIST not found in /usr/share/datasets/fashion-mnist: run "
                        "'apt-get install dataset-fashion-mnist', or copy its files (" + ", ".join(FASHION_FILES) +
                        ") into build/data/fashion-mnist or the folder named by EDGEFUSE_FASHION_MNIST")


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise EdgefuseError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise EdgefuseError(f"{path} is not an IDX file (empty or damaged): reinstall dataset-fashion-mnist")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise EdgefuseError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1], shape (n, 1, 28, 28), and int64 labels: the zoo models' input contract."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = fashion_mnist_dir()
    x = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if len(x) != len(y):
        raise EdgefuseError(f"Fashion-MNIST {split} split in {root}: {len(x)} images but {len(y)} labels (damaged "
                            "files: reinstall dataset-fashion-mnist)")
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return images, torch.from_numpy(y.astype(np.int64))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits as (n, 1, 8, 8) floats in [0, 1]: small enough for fast tests."""
    load_digits = optional("sklearn.datasets", "scikit-learn", "the digits data set").load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target, dtype=torch.int64)


def batches(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 256) -> list:
    """A plain list of batches, the simplest form of `data` the public functions accept."""
    out = []
    for i in range(0, len(x), batch_size):
        out.append(x[i:i + batch_size] if y is None else (x[i:i + batch_size], y[i:i + batch_size]))
    return out


def inputs_of(data: Iterable) -> Iterator[torch.Tensor]:
    """Input tensors of `data`, whether it yields tensors or (inputs, labels) pairs."""
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def require_batches(data: Iterable | None, what: str, model: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """Materialise calibration inputs, refusing an empty or missing set, non-finite values, batches of different
    shapes, or (given `model`) batches the model cannot take, with a message that says what needs them."""
    if data is None:
        raise EdgefuseError(f"{what} needs calibration data (data=...), none was given")
    xs = list(inputs_of(data))
    if not xs or sum(len(x) for x in xs) == 0:
        raise EdgefuseError(f"{what} needs calibration data, but the calibration set is empty")
    for i, x in enumerate(xs):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise EdgefuseError(f"{what}: calibration batch {i} holds {int((~torch.isfinite(x)).sum())} NaN or Inf "
                                "values")
    shapes = sorted({tuple(x.shape[1:]) for x in xs})
    if len(shapes) > 1:
        raise EdgefuseError(f"{what}: calibration batches of different shapes {', '.join(map(str, shapes))}")
    if model is not None:
        _check_fits(model, xs[0][:1], what)
    return xs


def trial_run(model: torch.nn.Module, x: torch.Tensor, failure: str):
    """The model's output on `x` in eval mode (so no statistic moves), every module given back its own mode after;
    an input it cannot take is one line, `failure` followed by the framework's first line."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:  # torch reports a shape mismatch as RuntimeError, others as other types
        raise EdgefuseError(f"{failure}: {first_line(e)}") from None
    finally:
        for m, training in modes:
            m.training = training


def _check_fits(model: torch.nn.Module, x: torch.Tensor, what: str) -> None:
    trial_run(model, x, f"{what}: calibration inputs of shape {tuple(x.shape[1:])} do not fit the model")


@dataclass(frozen=True)
class Splits:
    """Three disjoint parts of one dataset: `train` (zoo training, calibration, unlabeled distillation inputs),
    `val` (the choice between candidates) and `test` (reported only, never used to choose). `x_train` may be a tensor
    or inputs read from disk when indexed (models/images.py); its labels are optional. `name` is the source as the
    user gave it, `classes` the class names where the data has them, `origins` where train, val and test came from."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...] = ()
    origins: tuple[str, str, str] = ()
    calibration_images: int = CALIBRATION_IMAGES  # 0: every training image

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])

    @property
    def n_classes(self) -> int:
        """Named classes, else one more than the largest label seen."""
        if self.classes:
            return len(self.classes)
        labels = [y for y in (self.y_train, self.y_val, self.y_test) if y is not None and len(y)]
        return max(int(y.max()) for y in labels) + 1

    @cached_property
    def digest(self) -> str:
        """Identity of the data for stored results: the source, the sizes, and the validation and test tensors;
        hashed once per process, not once per job that asks."""
        import hashlib

        h = hashlib.sha256(f"{self.name}\0{len(self.x_train)}\0{self.classes}\0{self.n_calib}".encode())
        for t in (self.x_val, self.y_val, self.x_test, self.y_test):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def with_calibration(self, images: int | None) -> Splits:
        """The same splits calibrating on `images` training images (0: all; None: as they are)."""
        return self if images is None else replace(self, calibration_images=images)

    @property
    def n_calib(self) -> int:
        """How many training images calibrate (alignment, BatchNorm reset, REPAIR and lsq statistics)."""
        n = len(self.x_train)
        return n if self.calibration_images == 0 else min(self.calibration_images, n)

    @property
    def calib(self) -> torch.Tensor:
        """A fixed random subset of the training part, the same in every run."""
        gen = torch.Generator().manual_seed(0)
        return self.x_train[torch.randperm(len(self.x_train), generator=gen)[:self.n_calib]]

    @property
    def calib_batches(self) -> list[torch.Tensor]:
        return batches(self.calib, batch_size=200)

    @property
    def example(self) -> torch.Tensor:
        return self.x_test[:2]


def holdout_indices(n: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): a seeded permutation of n samples, whose last `n_val` are validation."""
    if not 0 < n_val < n:
        raise EdgefuseError(f"cannot hold out {n_val} of {n} samples for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[:-n_val], order[-n_val:]


def holdout(x: torch.Tensor, y: torch.Tensor, n_val: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val): a seeded permutation's last `n_val` samples are validation."""
    train, val = holdout_indices(len(x), n_val)
    return x[train], y[train], x[val], y[val]


BUILTIN = ("fashion-mnist", "digits")


def load_dataset(name: str) -> Splits:
    """Fashion-MNIST (55,000 train / 5,000 validation from its training file, its 10,000 test images) or sklearn
    digits (1,000 / 297 / 500), for the zoo and for every choice the pipeline makes."""
    if name == "fashion-mnist":
        x, y = fashion_mnist("train")
        x_test, y_test = fashion_mnist("test")
        return Splits(name, *holdout(x, y, VALIDATION_IMAGES), x_test, y_test, FASHION_CLASSES,
                      (f"Fashion-MNIST's training file minus the hold-out ({len(x) - VALIDATION_IMAGES:,} images)",
                       f"{VALIDATION_IMAGES:,} images held out (seed 0) of Fashion-MNIST's training file",
                       f"Fashion-MNIST's test file ({len(x_test):,} images)"))
    if name == "digits":
        x, y = digits()
        return Splits(name, x[:1000], y[:1000], x[1000:1297], y[1000:1297], x[1297:], y[1297:],
                      tuple(str(d) for d in range(10)),
                      ("sklearn digits 0-999", "sklearn digits 1000-1296", "sklearn digits 1297-1796"))
    raise EdgefuseError(f"unknown dataset '{name}' (choose from fashion-mnist, digits)")


def test_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the test part: what `edgefuse verify` reads, so a machine with just the test files can use it."""
    if name == "fashion-mnist":
        return fashion_mnist("test")
    splits = load_dataset(name)
    return splits.x_test, splits.y_test
