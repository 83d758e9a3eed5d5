"""Where the data comes from: a built-in name, an ImageFolder, an `.npz` file or a loader hook (`MODULE:FUNCTION`,
as Polygraphy's --data-loader-script), turned into the three splits every job uses. Without a validation split, a
seeded hold-out of the training split chooses. Training labels are optional: only validation and test need them."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..base.errors import EdgefuseError, first_line
from ..base.hooks import import_callable, is_hook
from .data import BUILTIN, VALIDATION_IMAGES, Splits, holdout_indices, load_dataset
from .images import ImageFiles, scan_classes

KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
REQUIRED = ("x_train", "x_test", "y_test")


def default_val_size(n_train: int) -> int:
    """A tenth of the training split, at most Fashion-MNIST's 5,000, at least one sample."""
    return max(1, min(VALIDATION_IMAGES, n_train // 10))


def load_data(source: str, val_size: int | None = None) -> Splits:
    """The splits of `source`: "fashion-mnist" or "digits", a folder with train/ and test/ (optional val/) of
    <class>/<image> files, an .npz file with x_train, x_test, y_test (optional y_train, x_val, y_val), or
    MODULE:FUNCTION returning a mapping with those keys (tensors, arrays or torch Datasets)."""
    if source in BUILTIN:
        if val_size is not None:
            raise EdgefuseError(f"--val-size applies to your own data; {source} has fixed splits")
        return load_dataset(source)
    path = Path(source)
    if path.is_dir():
        return _folder(path, val_size)
    if path.suffix == ".npz" or path.is_file():
        if not path.is_file():
            raise EdgefuseError(f"data file not found: {source}")
        return _assemble(source, _npz(path), val_size, ())
    if is_hook(source):
        return _assemble(source, _hook(source), val_size, ())
    raise EdgefuseError(f"data '{source}' is not a built-in set ({', '.join(BUILTIN)}), a folder, an .npz file or "
                        "module.path:function")


def _folder(root: Path, val_size: int | None) -> Splits:
    """ImageFolder layout; labels are indices into the sorted class folders of train/."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise EdgefuseError(f"{root} needs train/<class>/<image> and test/<class>/<image> folders (val/ optional)")
    train = scan_classes(root / "train")
    classes = tuple(train)
    parts: dict = {}
    for split in ("train", "val", "test"):
        if split != "train" and not (root / split).is_dir():
            continue
        found = train if split == "train" else scan_classes(root / split)
        extra = sorted(set(found) - set(classes))
        if extra:
            raise EdgefuseError(f"{root / split} has class '{extra[0]}' that {root / 'train'} lacks")
        files = [f for c in found for f in found[c]]
        parts[f"x_{split}"] = ImageFiles.scan(files)
        parts[f"y_{split}"] = torch.tensor([classes.index(c) for c in found for _ in found[c]], dtype=torch.int64)
    shapes = {k: v.shape[1:] for k, v in parts.items() if k.startswith("x_")}
    if len(set(shapes.values())) > 1:
        raise EdgefuseError(f"{root}: splits of different image shapes: " +
                            ", ".join(f"{k[2:]} {'x'.join(map(str, s))}" for k, s in shapes.items()) +
                            "".join(parts[k].why_channels() for k in shapes))
    return _assemble(str(root), parts, val_size, classes)


def _npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle: refused, as checkpoints are
        raise EdgefuseError(f"cannot read {path}: {first_line(e)}") from None
    except Exception as e:  # a damaged zip raises several types
        raise EdgefuseError(f"cannot read {path} as .npz: {first_line(e)}") from None


def _hook(spec: str) -> dict:
    fn = import_callable(spec, "data loader")
    try:
        got = fn()
    except Exception as e:
        raise EdgefuseError(f"data loader '{spec}' raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(got, Mapping):
        raise EdgefuseError(f"data loader '{spec}' returned {type(got).__name__}, expected a mapping with keys "
                            f"{', '.join(REQUIRED)}")
    return dict(got)


def _inputs(value, key: str, source: str):
    """Inputs as a float32 tensor (integer arrays are images in 0..255), or a lazily read Dataset/ImageFiles."""
    if isinstance(value, ImageFiles):
        return value
    if isinstance(value, torch.utils.data.Dataset) and not isinstance(value, torch.Tensor):
        return DatasetInputs(value, key, source)
    try:
        arr = torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as e:
        raise EdgefuseError(f"{source}: '{key}' is not an array: {first_line(e)}") from None
    if arr.ndim < 2 or len(arr) == 0:
        raise EdgefuseError(f"{source}: '{key}' has shape {tuple(arr.shape)}: expected (samples, ...) with at least "
                            "one sample")
    if arr.dtype == torch.uint8:
        return arr.float() / 255.0
    if not (arr.is_floating_point() or arr.dtype in (torch.int16, torch.int32, torch.int64)):
        raise EdgefuseError(f"{source}: '{key}' holds {arr.dtype}, not numbers")
    x = arr.float()
    if not torch.isfinite(x).all():
        raise EdgefuseError(f"{source}: '{key}' holds NaN or Inf values")
    return x


def _labels(value, key: str, source: str, n: int) -> torch.Tensor:
    """One class index per sample, from labels of any integer dtype (or whole-number floats); fractional, string
    or boolean labels are refused in one line naming the first offending one."""
    raw = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if raw.ndim != 1 or raw.dtype.kind not in "iuf":
        what = "strings" if raw.dtype.kind in "USO" else str(raw.dtype)
        first = f" (first: {str(raw.reshape(-1)[0])!r})" if raw.dtype.kind in "USO" and raw.size else ""
        raise EdgefuseError(f"{source}: '{key}' must be one integer class per sample, got {what} of shape "
                            f"{tuple(raw.shape)}{first}" + ("; map class names to indices 0..C-1" if first else ""))
    if raw.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if len(bad):
            raise EdgefuseError(f"{source}: '{key}' holds a label that is not a whole number ({raw[bad[0]].item():g} "
                                f"at index {int(bad[0])})")
    if raw.dtype.kind == "u" and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
        raise EdgefuseError(f"{source}: '{key}' holds a label too large to be a class index ({int(raw.max())})")
    arr = torch.from_numpy(raw.astype(np.int64))
    if len(arr) != n:
        raise EdgefuseError(f"{source}: '{key}' has {len(arr)} labels but x_{key[2:]} has {n} samples")
    if len(arr) and int(arr.min()) < 0:
        raise EdgefuseError(f"{source}: '{key}' holds a negative label ({int(arr.min())})")
    return arr.long()


SCALE_RATIO = 20.0  # splits whose largest magnitudes differ this much are on different scales (0..255 vs 0..1)


def _one_scale(xs: dict, source: str) -> None:
    """Every split on one value range: a split in 0..255 beside one in 0..1 (a float array of raw pixels beside
    uint8 ones, which are divided by 255) would reach the model on different scales without a word. The training
    split is judged by its first 256 inputs."""
    peak = {k: float(x[:256].abs().max())
            for k, x in xs.items() if len(x)}
    low, high = min(peak, key=peak.get), max(peak, key=peak.get)
    if peak[high] > SCALE_RATIO * max(peak[low], 1e-6) and peak[high] > 2.0:
        raise EdgefuseError(f"{source}: '{high}' reaches {peak[high]:g} while '{low}' stays within {peak[low]:g}: "
                            "the splits are on different scales (uint8 inputs are divided by 255, other numbers "
                            "are read as they are); give every split on one scale")


def _assemble(source: str, parts: dict, val_size: int | None, classes: tuple[str, ...]) -> Splits:
    """Check the keys and lengths, materialise validation and test (every candidate runs them), hold out
    validation from the training split when none was given, and say where each split came from."""
    unknown = sorted(set(parts) - set(KEYS))
    if unknown:
        raise EdgefuseError(f"{source}: unknown key '{unknown[0]}' (expected {', '.join(KEYS)})")
    missing = [k for k in ("x_train", "x_test") if k not in parts]
    if missing:
        raise EdgefuseError(f"{source}: missing '{missing[0]}' (needs {', '.join(REQUIRED)}; optional y_train, "
                            "x_val, y_val)")
    xs = {k: _inputs(parts[k], k, source) for k in ("x_train", "x_val", "x_test") if k in parts}
    for k, x in xs.items():  # a Dataset of (input, label) items gives its own labels where none are given
        y = "y" + k[1:]
        if isinstance(x, DatasetInputs) and y not in parts and (k != "x_train" or "x_val" not in xs):
            parts[y] = x.labels()
    for need in ("y_test",) + (("y_val",) if "x_val" in xs else ()):
        if need not in parts:
            raise EdgefuseError(f"{source}: missing '{need}' (validation and test need labels)")
    if "y_val" in parts and "x_val" not in parts:
        raise EdgefuseError(f"{source}: y_val without x_val")
    ys = {k: _labels(parts[k], k, source, len(xs["x" + k[1:]])) for k in ("y_train", "y_val", "y_test")
          if k in parts}
    for k in ("x_val", "x_test"):
        if k in xs and not isinstance(xs[k], torch.Tensor):
            xs[k] = xs[k].load()
    _one_scale(xs, source)
    shapes = {k: tuple(x.shape[1:]) for k, x in xs.items()}
    if len(set(shapes.values())) > 1:
        raise EdgefuseError(f"{source}: inputs of different shapes: " +
                            ", ".join(f"{k} {s}" for k, s in shapes.items()))
    x_train, y_train = xs["x_train"], ys.get("y_train")
    n_train = len(x_train)
    origins = {"train": f"{source}: train ({n_train:,} samples)", "test": f"{source}: test ({len(xs['x_test']):,})"}
    if "x_val" in xs:
        if val_size is not None:
            raise EdgefuseError(f"{source} has its own validation split: --val-size does not apply")
        x_val, y_val = xs["x_val"], ys["y_val"]
        origins["val"] = f"{source}: val ({len(x_val):,})"
    else:
        if y_train is None:
            raise EdgefuseError(f"{source}: without x_val/y_val the validation split is held out of the training "
                                "split, which then needs labels (y_train)")
        n_val = default_val_size(n_train) if val_size is None else val_size
        keep, held = holdout_indices(n_train, n_val)
        x_val = x_train[held] if isinstance(x_train, torch.Tensor) else x_train.subset(held)[:]
        y_val = y_train[held]
        x_train = x_train[keep] if isinstance(x_train, torch.Tensor) else x_train.subset(keep)
        y_train = y_train[keep]
        origins["train"] = f"{source}: train minus the hold-out ({len(keep):,} samples)"
        origins["val"] = f"seeded hold-out (seed 0) of {n_val:,} samples from {source}'s training split"
    return Splits(source, x_train, y_train, x_val, y_val, xs["x_test"], ys["y_test"], classes,
                  tuple(origins[k] for k in ("train", "val", "test")))


class DatasetInputs:
    """The inputs of a torch Dataset (items `x` or `(x, y, ...)`), read only when indexed, like ImageFiles."""

    def __init__(self, dataset, key: str, source: str) -> None:
        self.dataset, self.key, self.source = dataset, key, source
        try:
            self._len = len(dataset)
            first = self._item(0) if self._len else None
        except EdgefuseError:
            raise
        except Exception as e:
            raise EdgefuseError(f"{source}: '{key}' Dataset failed: {type(e).__name__}: {first_line(e)}") from None
        if first is None:
            raise EdgefuseError(f"{source}: '{key}' is an empty Dataset")
        self.shape = (self._len, *first.shape)

    def _item(self, i: int) -> torch.Tensor:
        """One input as float32, uint8 divided by 255 as an array's is, so every source gives one range."""
        item = self.dataset[i]
        x = np.asarray(item[0] if isinstance(item, (tuple, list)) else item)
        return torch.as_tensor(x, dtype=torch.float32) / (255.0 if x.dtype == np.uint8 else 1.0)

    @property
    def dtype(self) -> np.dtype:
        item = self.dataset[0]
        return np.asarray(item[0] if isinstance(item, (tuple, list)) else item).dtype

    def __len__(self) -> int:
        return self._len

    def subset(self, index) -> "DatasetInputs":
        return DatasetInputs(torch.utils.data.Subset(self.dataset, torch.as_tensor(index).tolist()), self.key,
                             self.source)

    def __getitem__(self, index) -> torch.Tensor:
        idx = range(self._len)[index] if isinstance(index, slice) else torch.as_tensor(index).reshape(-1).tolist()
        try:
            return torch.stack([self._item(i) for i in idx])
        except Exception as e:
            raise EdgefuseError(f"{self.source}: '{self.key}' Dataset failed: {type(e).__name__}: "
                                f"{first_line(e)}") from None

    def load(self) -> torch.Tensor:
        return self[:]

    def labels(self) -> torch.Tensor:
        """The second element of every item: a Dataset of (input, label) pairs."""
        out = []
        for i in range(self._len):
            item = self.dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise EdgefuseError(f"{self.source}: '{self.key}' Dataset items carry no label; give "
                                    f"'y{self.key[1:]}' too")
            out.append(np.asarray(item[1]).reshape(-1)[0] if np.asarray(item[1]).size == 1 else item[1])
        return _labels(np.asarray(out), "y" + self.key[1:], self.source, self._len)

