"""Detection of the optional GPU extras (flash-attn, liger-kernel, triton).

Each fallback is logged exactly once, in one clear line, so a user can see which path runs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from distthink.logging_utils import get_logger

log = get_logger(__name__)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def has_liger() -> bool:
    ok = cuda_available() and _installed("liger_kernel") and _installed("triton")
    if not ok:
        why = "no CUDA device" if not cuda_available() else "liger-kernel/triton not installed (pip install 'distthink[gpu]')"
        log.info("liger-kernel path off (%s): using the chunked torch path for fused linear cross-entropy", why)
    return ok


@functools.lru_cache(maxsize=None)
def has_flash_attn() -> bool:
    ok = cuda_available() and _installed("flash_attn")
    if not ok:
        why = "no CUDA device" if not cuda_available() else "flash-attn not installed (pip install 'distthink[gpu]')"
        log.info("flash-attn varlen off (%s): using SDPA with a block-diagonal mask for packed rows", why)
    return ok
