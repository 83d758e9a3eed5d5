"""Image files that stay on disk: an ImageFolder split is scanned once (headers only, every image one size) and
decoded batch by batch when a step needs it, so a folder of tens of thousands of photos never becomes one tensor.
Pillow reads the files; a pool of threads decodes a batch (Pillow releases the GIL while it decodes)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base.errors import EdgefuseError, first_line

DECODE_THREADS = 4


def image_suffixes() -> frozenset[str]:
    """Every file suffix Pillow can open (PNG, JPEG, BMP, GIF, TIFF, WebP, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(s.lower() for s in Image.registered_extensions())


def scan_classes(folder: Path) -> dict[str, list[Path]]:
    """{class name: its image files}, classes sorted by name as torchvision's ImageFolder sorts them."""
    if not folder.is_dir():
        raise EdgefuseError(f"{folder} is not a folder")
    suffixes = image_suffixes()
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise EdgefuseError(f"class folder {d} holds no image Pillow reads")
        out[d.name] = files
    if not out:
        raise EdgefuseError(f"{folder} holds no class folders (expected {folder}/<class>/<image>)")
    return out


GREY = ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # modes read as one channel


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """An image's size and mode from its header; an animated one (GIF, multi-page TIFF) is refused by name, since
    only its first frame would be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if getattr(im, "is_animated", False):
                raise EdgefuseError(f"image {path} is animated ({getattr(im, 'n_frames', 'several')} frames): save "
                                    "the frame to learn from as a still image")
            return (im.height, im.width), im.mode
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise EdgefuseError(f"cannot read image {path}: {first_line(e)}") from None


@dataclass(frozen=True)
class ImageFiles:
    """Images on disk with one size; indexing like a tensor (`x[i]`, `x[a:b]`, `x[index_tensor]`) decodes just those
    files into float32 in [0, 1], channels first (1 channel when every file is greyscale, else 3). `colour` names
    the first colour file of a split that also holds greyscale ones: why that split reads as 3 channels."""
    files: tuple[str, ...]
    channels: int
    size: tuple[int, int]
    colour: str = ""

    @staticmethod
    def scan(files: list[Path]) -> "ImageFiles":
        """Read every header: one line naming two files of different sizes, or one that is not an image."""
        first_size, first = None, None
        grey, colour = 0, ""
        for f in files:
            size, mode = _header(f)
            if first_size is None:
                first_size, first = size, f
            elif size != first_size:
                raise EdgefuseError(f"images of different sizes: {first} is {first_size[1]}x{first_size[0]}, {f} is "
                                    f"{size[1]}x{size[0]} (resize them to one size first)")
            if mode in GREY:
                grey += 1
            elif not colour:
                colour = f"{f} is {mode}"
        if first_size is None:
            raise EdgefuseError("no images to read")
        return ImageFiles(tuple(str(f) for f in files), 3 if colour else 1, first_size, colour if grey else "")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), self.channels, *self.size)

    def subset(self, index) -> "ImageFiles":
        idx = torch.as_tensor(index).reshape(-1).tolist()
        return ImageFiles(tuple(self.files[i] for i in idx), self.channels, self.size, self.colour)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.decode(self.files[index])
        if isinstance(index, slice):
            names = self.files[index]
        else:
            names = [self.files[i] for i in torch.as_tensor(index).reshape(-1).tolist()]
        if not names:
            return torch.zeros((0, self.channels, *self.size))
        with ThreadPoolExecutor(min(DECODE_THREADS, len(names))) as pool:
            return torch.stack(list(pool.map(self.decode, names)))

    def decode(self, name: str) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(name) as im:
                arr = _unit_range(im, name, self.channels)
        except (OSError, ValueError, SyntaxError) as e:
            raise EdgefuseError(f"cannot decode image {name}: {first_line(e)}") from None
        if arr.shape[:2] != self.size:
            raise EdgefuseError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, the others "
                                f"{self.size[1]}x{self.size[0]}")
        t = torch.from_numpy(arr)
        return t.unsqueeze(0) if self.channels == 1 else t.permute(2, 0, 1).contiguous()

    def why_channels(self) -> str:
        """Words for an error about the channel count: which file made a mostly greyscale split colour."""
        return f" ({self.colour} among greyscale images, so the split reads as 3 channels)" if self.colour else ""

    def load(self) -> torch.Tensor:
        """Every image as one tensor: for the validation and test splits, which every candidate runs through."""
        return self[:]


WIDE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}  # 16-bit greyscale modes


def _unit_range(im, name: str, channels: int) -> np.ndarray:
    """An image's pixels as float32 in [0, 1] by its mode: 8-bit modes over 255, 16-bit greyscale over 65535, a
    float image as it is when it lies in [0, 1]. Pillow's convert() would clip the others to 8 bits (a 16-bit PNG
    turns black and white, a float TIFF near-black), so they are refused by name instead."""
    if im.mode in WIDE or im.mode in ("I", "F"):
        if im.mode == "I":  # 32-bit integers: no range to scale by, short of guessing
            raise EdgefuseError(f"image {name} holds 32-bit integer pixels (mode I): save it as 8- or 16-bit")
        grey = np.asarray(im, dtype=np.float32) / WIDE.get(im.mode, 1.0)
        if im.mode == "F" and not (np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= 1):
            raise EdgefuseError(f"image {name} holds float pixels outside [0, 1] (from {float(np.nanmin(grey)):g} to "
                                f"{float(np.nanmax(grey)):g}): scale it to [0, 1] or save it as 8 or 16 bits")
        return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0

