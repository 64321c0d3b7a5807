"""Resume a DeepSpeed ZeRO checkpoint on another number of ranks: convert it once to DeepSpeed's universal format.

ZeRO splits the optimizer state (stage 3: the parameters too) over the ranks that share it: the whole world,
sequence-parallel ranks included (DeepSpeed's seq-data-parallel group). A checkpoint holds one shard file per such
rank, `pytorch_model/*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, and DeepSpeed refuses to load it at another
count ("The checkpoint being loaded used a DP world size of 2 but the current world size is 1").

DeepSpeed's `ds_to_universal` rewrites the shards as one folder per parameter (fp32 master weights, Adam's
exp_avg and exp_avg_sq, unpartitioned), which an engine built with `"checkpoint": {"load_universal": true}`
re-partitions over any number of ranks. Here that happens automatically:

- `layout_changed(checkpoint, world)` reads the shard count from the checkpoint's files (before any process
  group exists, because the DeepSpeed config must say `load_universal` when the engine is built);
- `universal_dir(checkpoint, world)` (collective) converts once, on rank 0, into `<checkpoint>/universal/`: written
  under a temporary name and renamed when complete (so a crash leaves no half conversion), with the ranks' RNG
  files copied next to it so that accelerate's `load_state` restores them from there. Other ranks wait at a
  barrier; a later resume at any world size reuses the folder. It lives inside the step directory, so pruning
  old checkpoints removes it too. One log line on rank 0 says what was converted and why (or that it is reused).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import time
from pathlib import Path

import torch

from distthink.engine.distributed import barrier
from distthink.errors import CheckpointError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

DS_TAG = "pytorch_model"  # the checkpoint id accelerate gives the DeepSpeed engine's state
UNIVERSAL = "universal"


def saved_zero_ranks(checkpoint: Path) -> int:
    """How many ranks the checkpoint's ZeRO state is partitioned over (0: no ZeRO optimizer state)."""
    return len(list((Path(checkpoint) / DS_TAG).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def layout_changed(checkpoint: Path | None, world: int) -> bool:
    """True when `checkpoint` holds ZeRO shards of another world size than `world` (it needs the universal form)."""
    saved = saved_zero_ranks(checkpoint) if checkpoint is not None else 0
    return saved > 0 and saved != world


def universal_dir(checkpoint: Path, world: int, is_main: bool) -> Path:
    """Collective. The checkpoint's universal form (converted now on rank 0 unless already there)."""
    target = Path(checkpoint) / UNIVERSAL
    saved = saved_zero_ranks(checkpoint)
    error = None
    if is_main:
        why = f"{checkpoint.name} holds ZeRO state partitioned over {saved} rank(s) and this run has {world}"
        if (target / "latest_universal").is_file():
            log.info("%s: reusing its universal (re-shardable) conversion %s", why, target)
        else:
            try:
                seconds = _convert(Path(checkpoint), target)
                log.info("%s: converted its DeepSpeed state once to the universal (re-shardable) format in %s "
                         "(%.1f s); it is re-partitioned over %d rank(s) at load", why, target, seconds, world)
            except Exception as err:  # noqa: BLE001 - told to every rank below, so that none waits at the barrier
                error = f"{type(err).__name__}: {err}"
    error = _share(error)
    if error:
        raise CheckpointError(f"converting {checkpoint} to DeepSpeed's universal checkpoint format (needed to resume "
                              f"{saved} ZeRO shard(s) on {world} rank(s)) failed: {error}. Fix: resume on {saved} "
                              "rank(s), or convert by hand with `python -m deepspeed.checkpoint.ds_to_universal "
                              f"--input_folder {Path(checkpoint) / DS_TAG} --output_folder {target / DS_TAG}` and "
                              f"copy {checkpoint}/random_states_*.pkl into {target}")
    barrier()
    return target


def _convert(checkpoint: Path, target: Path) -> float:
    """ds_to_universal into a temporary sibling of `target`, then one rename. Returns the seconds it took."""
    # deepspeed is imported only by DeepSpeed runs (heavy); this module is reached only from one
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.time()
    for stale in target.parent.glob(f".tmp-{target.name}-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    tmp.mkdir()
    args = argparse.Namespace(input_folder=str(checkpoint / DS_TAG), output_folder=str(tmp / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # ZeRO-1/2 checkpoints lack the metadata it wants
    chatter = io.StringIO()  # its progress prints: shown only if it fails
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), torch.no_grad():
            ds_to_universal.main(args)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{err} (ds_to_universal said: {chatter.getvalue()[-2000:]})") from err
    for rng in checkpoint.glob("random_states_*.pkl"):
        shutil.copy2(rng, tmp / rng.name)
    os.replace(tmp, target)
    return time.time() - t0


def _share(error: str | None) -> str | None:
    """Rank 0's conversion error (or None), on every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
