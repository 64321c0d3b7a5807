"""One logger setup for the whole package: readable, rank-aware, no duplicate lines."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str = "distthink") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK")
        prefix = f"[rank{rank}] " if rank not in (None, "") and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root = logging.getLogger("distthink")
        root.addHandler(handler)
        root.setLevel(os.environ.get("DISTTHINK_LOG_LEVEL", "INFO").upper())
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name)
