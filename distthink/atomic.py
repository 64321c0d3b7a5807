"""Crash-safe file writes: a reader sees the old file or the whole new one, never a half-written one.

Used by checkpoints (distthink/engine/checkpoint.py) and the encoded-data cache (distthink/data/cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file next to `path`, fsync it, then rename it over `path` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename inside it) on filesystems that need it; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
