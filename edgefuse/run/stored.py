"""A sweep's finished points, one JSON file each, so that a stopped sweep resumes where it stopped: the row, the
fingerprint of its inputs and digests of it and of every file it names. Nothing stored is trusted unchecked."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..base.files import atomic_write_text, file_digest
from .candidate import Candidate


def _sealed(body: dict) -> str:
    """The digest a stored point carries: of its result, its fingerprint and the digests of the files it names."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store_point(row: Candidate, store: Path, key: str) -> None:
    """A finished point, one JSON file under `store`: the row, the fingerprint of its inputs, the digest of each
    file it names (relative paths inside the sweep folder) and a digest of all of it."""
    body = row.to_json(store.parent, stored=True) | {"fingerprint": key}
    body["files"] = {body["file"]: file_digest(Path(row.file))} if row.file else {}
    atomic_write_text(store / f"{row.key}.json", json.dumps(body | {"digest": _sealed(body)}, indent=1))


def stored_point(path: Path, key: str) -> tuple[Candidate | None, str | None]:
    """A stored point when every check holds, else None and why it is recomputed (None: stored for other inputs,
    which is no news). Nothing stored is trusted unchecked: an edited result or file is measured again."""
    root = path.parent.parent
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None, "its file cannot be read"
    if not isinstance(body, dict) or body.get("fingerprint") != key:
        return None, None if isinstance(body, dict) and "fingerprint" in body else "it is not a stored point"
    digest = body.pop("digest", None)
    if digest != _sealed(body):
        return None, "its result does not match its digest (edited by hand?)"
    files = body.pop("files", {})
    for rel, want in files.items():
        f = (root / rel).resolve()
        if root.resolve() not in f.parents:
            return None, f"it names a file outside the sweep folder ({rel})"
        if not f.is_file() or file_digest(f) != want:
            return None, f"{rel} is missing or changed"
    if body.get("file") and body["file"] not in files:
        return None, "its file has no digest"
    try:
        return Candidate.from_json({k: v for k, v in body.items() if k != "fingerprint"}, root), None
    except (KeyError, TypeError, ValueError) as e:
        return None, f"it cannot be read ({type(e).__name__})"
