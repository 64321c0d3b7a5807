"""One logger setup for the whole package: readable, rank-aware, no duplicate lines."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str = "distthink") -> logging.Logger:
    """The package's logger. Under a multi-rank launch, rank 0 logs run-wide facts (INFO and up) and every other
    rank only its warnings and errors, prefixed with its rank, so a 2-rank run prints each event once.
    DISTTHINK_LOG_LEVEL sets the level of every rank (e.g. INFO to see each rank's lines, DEBUG for more)."""
    global _CONFIGURED
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK", "0") or "0"
        multi = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
        prefix = f"[rank{rank}] " if multi and rank != "0" else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root = logging.getLogger("distthink")
        root.addHandler(handler)
        default = "WARNING" if multi and rank != "0" else "INFO"
        root.setLevel(os.environ.get("DISTTHINK_LOG_LEVEL", default).upper())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name)
