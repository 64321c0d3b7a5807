"""Content digests of data sources: what tells two runs (or a run and its checkpoint) whether they read the
same bytes. Streaming sha256, so a corpus larger than memory is fine; a folder digests its files in order."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def source_digest(spec: str | None) -> str | None:
    """The digest of a data source named in the config: a file's bytes, a folder's files (relative names and
    bytes, in sorted order), or None for what is not a local path (`bundled`, a hub name): those are named by
    the config itself."""
    if not spec:
        return None
    path = Path(spec)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + file_digest(f).encode())
        return h.hexdigest()
    return None
