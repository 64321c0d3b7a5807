"""One writer per filesystem, every rank a reader: how the ranks of a launch get a split's cache entry.

    data = open_split(encoding, tokenizer, cache_dir=..., num_proc=8, scope="global", label="data.train")

1. The writer (global rank 0; with scope="node" the local rank 0 of each node, for node-local cache disks)
   fingerprints the encoding inputs (distthink/data/fingerprint.py). The key travels to every rank in one small
   collective, so only the writer hashes the sources; a node writer checks it computed the same key as rank 0
   (else its inputs differ from rank 0's and the run stops with the fix).
2. Entry present: nothing is encoded. Entry missing: the writer encodes it with `num_proc` processes
   (distthink/data/parallel_encode.py) while the other ranks wait, polling the filesystem, with one line every
   30 s per node saying how far the writer is. Waiting happens outside any collective, so no process-group
   timeout limits how long an encode may take; a writer that makes no progress for `stall_timeout_s` stops them.
   A writer that fails leaves a marker with its error, so waiting ranks stop with it instead of hanging.
3. Every rank opens the same entry (distthink/data/cache.py: read with pread, shared through the page cache).

Without a process group (one process, `distthink prepare`) the caller is the writer.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import torch

from distthink.atomic import write_text_atomic
from distthink.data.cache import CachedSplit, is_complete, remove_stale_temps
from distthink.data.parallel_encode import SplitEncoding, build_split, encoding_key, entry_name
from distthink.engine.distributed import all_gather_object
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

POLL_S = 0.5
WAIT_LOG_S = 30.0


def ranks() -> tuple[int, int, int]:
    """(world, rank, local rank) of this process (1, 0, 0 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return world, rank, int(os.environ.get("LOCAL_RANK", rank))
    return 1, 0, 0


def _marker(cache_dir: Path, kind: str, key: str, nonce: str = "") -> Path:
    return cache_dir / f".{kind}-{key[:16]}{'-' + nonce if nonce else ''}"


def open_split(enc: SplitEncoding, tokenizer, *, cache_dir: Path, num_proc: int, scope: str = "global",
               on_error: str = "raise", label: str = "split", progress: bool = True,
               stall_timeout_s: float = 1800.0) -> CachedSplit:
    """The split's cache entry, built by one writer if missing (see the module docstring). Collective when a
    process group exists: every rank must call it, in the same order for the same splits."""
    if scope not in ("global", "node"):
        raise ConfigError(f"data.cache_scope={scope!r}. Fix: use global or node")
    cache_dir = Path(cache_dir)
    world, rank, local_rank = ranks()
    if scope == "node" and world > 1 and "LOCAL_RANK" not in os.environ:
        raise ConfigError("data.cache_scope=node needs LOCAL_RANK (set by torchrun / accelerate launch) to find each "
                          "node's writer. Fix: launch with torchrun or accelerate, or use data.cache_scope=global")
    writer = rank == 0 if scope == "global" else local_rank == 0
    inputs = key = None
    if writer:
        cache_dir.mkdir(parents=True, exist_ok=True)
        inputs, key = encoding_key(enc, tokenizer, cache_dir / ".hashes")
    nonce = ""
    if world > 1:
        mine = (key, secrets.token_hex(6) if rank == 0 else None)
        key0, nonce = all_gather_object(mine)[0]
        if writer and key != key0:
            raise ConfigError(f"{label}: the encoding inputs on this node differ from rank 0's (key {key[:16]} vs "
                              f"{key0[:16]}): the data file, tokenizer or code differ between nodes. Fix: give every "
                              "node the same files (or use data.cache_scope=global on a shared filesystem)")
        key = key0
    entry = cache_dir / entry_name(enc, key)
    if writer:
        _write_if_missing(enc, tokenizer, cache_dir, entry, inputs, key, nonce, num_proc=num_proc,
                          on_error=on_error, label=label, progress=progress, log_it=rank == 0)
    else:
        _wait(entry, cache_dir, key, nonce, label=label, stall_timeout_s=stall_timeout_s,
              log_it=local_rank == 1 or (scope == "global" and rank == 1))
    return CachedSplit(entry, unpack=enc.unpack)


def _write_if_missing(enc, tokenizer, cache_dir: Path, entry: Path, inputs: dict, key: str, nonce: str, *,
                      num_proc: int, on_error: str, label: str, progress: bool, log_it: bool) -> None:
    if is_complete(entry):
        if log_it:
            meta = json.loads((entry / "meta.json").read_text())
            log.info("%s: cached encoding %s (%d samples, %d tokens, encoded %s) - nothing to encode", label, entry,
                     meta["samples"], meta["tokens"], meta.get("created", "?"))
        return
    remove_stale_temps(cache_dir)
    for old in list(cache_dir.glob(".failed-*")) + list(cache_dir.glob(".progress-*")):
        if time.time() - old.stat().st_mtime > 24 * 3600:
            old.unlink(missing_ok=True)
    log.info("%s: no cached encoding yet: encoding it with %d process(es) into %s (`distthink prepare` does this "
             "ahead of time)", label, num_proc, entry)
    progress_file = _marker(cache_dir, "progress", key)

    def report_progress(state: dict) -> None:
        write_text_atomic(progress_file, json.dumps(state))

    try:
        build_split(enc, tokenizer, cache_dir, entry.name, inputs=inputs, num_proc=num_proc, on_error=on_error,
                    label=label, progress=progress, on_progress=report_progress)
    except BaseException as err:
        if nonce:  # the waiting ranks stop with this error instead of waiting for an entry that never comes
            write_text_atomic(_marker(cache_dir, "failed", key, nonce), f"{type(err).__name__}: {err}")
        raise
    finally:
        progress_file.unlink(missing_ok=True)


def _wait(entry: Path, cache_dir: Path, key: str, nonce: str, *, label: str, stall_timeout_s: float,
          log_it: bool) -> None:
    failed = _marker(cache_dir, "failed", key, nonce)
    progress_file = _marker(cache_dir, "progress", key)
    start = last_change = last_log = time.time()
    seen = None
    logged = False
    while not is_complete(entry):
        if failed.is_file():
            raise DataError(f"the writing rank could not encode {label}: {failed.read_text()}",
                            source=str(entry), reason="encode_failed", fix="see the writing rank's error above")
        now = time.time()
        try:
            state = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            state = None
        if state != seen:
            seen, last_change = state, now
        if now - last_change > stall_timeout_s:
            raise DataError(f"the writing rank made no progress encoding {label} for {stall_timeout_s:.0f} s",
                            source=str(entry), reason="encode_stalled",
                            fix="check the writing rank (rank 0, or local rank 0 with data.cache_scope=node); "
                                "build the cache ahead with `distthink prepare`")
        if log_it and (not logged or now - last_log >= WAIT_LOG_S):
            what = (f"{state['records']} records, {state['samples']} samples, {state['tokens'] / 1e6:.1f}M tokens "
                    "so far" if state else "starting")
            log.info("waiting for the writing rank to encode %s (%s, %.0f s)", label, what, now - start)
            last_log, logged = now, True
        time.sleep(POLL_S)
