"""Atomic output: write beside the destination, then rename, so a failure never leaves a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

try:  # in the package; a deploy bundle carries this file as files.py, for its lock
    from .errors import EdgefuseError
except ImportError:
    class EdgefuseError(Exception):
        """A problem the user can fix, printed as one line."""


def native(path: str | Path) -> str | bytes:
    """A model file as onnx's and onnxruntime's C++ loaders take it: its path, or its bytes when the path is not
    valid UTF-8 (they refuse such names, which Python itself opens fine)."""
    try:
        str(path).encode()
        return str(path)
    except UnicodeEncodeError:
        return Path(path).read_bytes()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: what stored points, cascade descriptions and bundle manifests record of the files
    they name, so a swapped or edited file is caught before it is trusted."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


@contextlib.contextmanager
def staged(dest: Path, outputs: tuple[str, ...] = (), root: Path | None = None, prefix: str | None = None):
    """A staging folder in `root` (default: beside `dest`, on its filesystem, so every final rename is atomic) to
    write a run's outputs into; when the block ends without an error they replace `dest`'s by `publish`, and the
    folder goes either way. The one way exports and bundles reach their destination."""
    root = root if root is not None else dest.parent
    stage = Path(tempfile.mkdtemp(dir=root, prefix=prefix or f".{dest.name}-staging-"))
    try:
        yield stage
        publish(stage, dest, outputs)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, dest: Path, outputs: tuple[str, ...] = ()) -> list[Path]:
    """Move every top-level entry of a finished staging folder into `dest`, each by an atomic rename; a folder
    replaces its namesake as a whole, so no file of an earlier export survives inside it. Of the entries of `dest`
    that the stage does not have, those named in `outputs` (what this kind of run writes: an earlier run's
    cascade/ when this one shipped no cascade) are removed, the rest (a sweep/ beside an export) left alone. Until
    this runs, `dest` is untouched."""
    dest.mkdir(parents=True, exist_ok=True)
    stale = [dest / n for n in outputs if not (stage / n).exists() and ((dest / n).exists() or (dest / n).is_symlink())]
    moved = []
    for src in sorted(stage.iterdir()):
        target = dest / src.name
        if src.is_dir() and target.is_dir():
            old = Path(tempfile.mkdtemp(dir=dest, prefix=f".{src.name}-old-"))
            os.replace(target, old / src.name)
            os.replace(src, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, target)
        moved.append(target)
    for old in stale:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return moved


def writable(folder: Path) -> None:
    """Check before any work that `folder` can be created and written, so a bad output path fails in a second."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise EdgefuseError(f"cannot write to {folder}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EdgefuseError(f"cannot write to {folder}: {e.strerror or e}") from None


def replaceable(dest: Path, outputs: tuple[str, ...]) -> None:
    """Check before any work that publish() can replace `dest`'s outputs: `dest` itself writable, and each output
    folder in it too (moving a folder to another parent rewrites its '..' entry), so a permission problem fails in
    a second instead of after every candidate was measured."""
    for p in (dest, *(dest / n for n in outputs)):
        if p.is_dir() and not p.is_symlink() and not os.access(p, os.W_OK | os.X_OK):
            raise EdgefuseError(f"cannot replace {p}: it is not writable (fix its permissions or choose another "
                                "--out-root)")


def room(folder: Path, needed: int, what: str) -> None:
    """Refuse work that needs about `needed` bytes in `folder` when its filesystem has less free, before it starts."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise EdgefuseError(f"{what} needs about {needed / 1e6:,.0f} MB in {folder}, whose disk has "
                            f"{free / 1e6:,.0f} MB free")


def _identity(pid: int) -> str:
    """A process as it cannot be mistaken for another: its pid, its start time (clock ticks since boot, from
    /proc) and the boot's id, so a pid reused after a restart or by a later process does not pass for the writer.
    Where /proc is missing, the pid alone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{pid} {start} {boot}"
    except (OSError, IndexError):
        return str(pid)


def stale_pid(path: Path, grace_s: float = 10.0) -> bool:
    """True when `path` names a process (its first line: pid, start time, boot id) that no longer runs, or whose
    pid another process now has. A lock without a readable pid is stale only after `grace_s` seconds: its writer
    may be between creating it and writing its pid."""
    try:
        recorded = path.read_text().split("\n")[0].split()
        pid = int(recorded[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, IndexError):
        return time.time() - path.stat().st_mtime > grace_s
    except FileNotFoundError:
        return True
    except PermissionError:  # the process exists, under another user
        return False
    return len(recorded) == 3 and _identity(pid).split() != recorded  # the pid is someone else's now


@contextlib.contextmanager
def exclusive(lock: Path, what: str):
    """One writer at a time: a lock file holding the writer's pid, taken over when that process is gone, removed
    when the writer is done. A second writer gets a one-line error instead of mixing its files with the first's."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.is_dir():
        raise EdgefuseError(f"{lock} is a folder where edgefuse keeps the lock for {what}: remove it")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not stale_pid(lock):
                holder = " ".join(lock.read_text().split()[:1]) if lock.exists() else "?"
                raise EdgefuseError(f"another edgefuse process (pid {holder}) is writing {what}; wait for it to "
                                    "finish") from None
            lock.unlink(missing_ok=True)
    else:
        raise EdgefuseError(f"cannot take the lock {lock} for {what}")
    try:
        os.write(fd, f"{_identity(os.getpid())}\n".encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def claimed(dest: Path, force: bool):
    """One output file for one writer, from the check to the final rename: a second command writing the same file
    stops at once (the lock), and an existing file is replaced only with `force`, checked under the lock."""
    dest = Path(dest)
    writable(dest.parent)
    with exclusive(dest.parent / f".{dest.name}.lock", str(dest)):
        if dest.exists() and not force:
            raise EdgefuseError(f"{dest} exists (use --force to overwrite)")
        yield dest


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
