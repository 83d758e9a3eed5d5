"""Atomic output: write beside the destination, then rename, so a failure never leaves a half-written file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def new_temp_path(dest: Path, suffix: str = "") -> Path:
    """An empty temporary file beside `dest` (same filesystem, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}-", suffix=suffix)
    os.close(fd)
    return Path(name)


def commit(tmp: Path, dest: Path) -> None:
    """Give the temporary file normal permissions (mkstemp makes it private) and rename it over `dest`."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    os.replace(tmp, dest)


def atomic_write_bytes(dest: str | Path, data: bytes) -> Path:
    dest = Path(dest)
    tmp = new_temp_path(dest)
    try:
        tmp.write_bytes(data)
        commit(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def atomic_write_text(dest: str | Path, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode())


def publish(stage: Path, dest: Path) -> list[Path]:
    """Move every file of a finished staging folder into `dest`, each by an atomic rename. Until this runs, a
    failure has touched nothing in `dest`."""
    moved = []
    for src in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = dest / src.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
        moved.append(target)
    return moved


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure written atomically, then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_path(path, path.suffix)
    try:
        fig.savefig(tmp, dpi=dpi)
        commit(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
