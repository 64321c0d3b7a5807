"""Atomic, resumable checkpoints (the export is distthink.engine.export, validation distthink.engine.check).

Layout under `<output_dir>/checkpoints/`:

    step-00000010/            one complete checkpoint
        trainer_state.json    step, epoch, data position, scheduler, learned-token total, NaN streak
        config.yaml           the full run config
        COMPLETE              written last, before the rename
        <accelerate state>    model/adapter + optimizer (DeepSpeed: every rank's ZeRO shards),
                              random_states_<rank>.pkl (python, numpy, torch RNG of each rank)
    latest                    text file holding the name of the newest complete checkpoint
    .tmp-step-00000020/       a save in progress (ignored, removed by the next save)

Atomicity: every rank writes into the temp directory; after a barrier, rank 0 writes the trainer
state and COMPLETE, renames the directory (atomic on POSIX within one filesystem) and only then
replaces `latest` (written to a temp file + os.replace). A crash at any point leaves `latest` pointing
at the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from distthink.atomic import fsync_dir, write_text_atomic
from distthink.engine import faults, reshard
from distthink.engine.distributed import barrier
from distthink.errors import CheckpointError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

class _TiedHeadNote(logging.Filter):
    """accelerate warns "Removed shared tensor {...lm_head.weight} while saving ... check ..." at every save of a
    model whose LM head is tied to its embeddings. That is the expected way to store tied weights (transformers
    does the same; loading re-ties them): replace the warning with one info line per process."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        names = message[message.find("{") + 1:message.find("}")].replace("'", "").split(", ")
        if "Removed shared tensor" not in message or not all(n.endswith("lm_head.weight") for n in names):
            return True
        if not _TiedHeadNote.said:
            _TiedHeadNote.said = True
            log.info("checkpoints store the tied LM head once, with the embeddings (as transformers does; loading "
                     "re-ties it)")
        return False


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNote())

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
LATEST = "latest"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict, config: dict,
                    keep_last: int = 2) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    root = checkpoint_root(output_dir)
    name = step_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    accelerator.save_state(str(tmp))  # model/adapter, optimizer (ZeRO shards), RNG of every rank
    barrier()
    if accelerator.is_main_process:
        faults.sleep_inside_save(step, name)  # a window to kill mid-save (tests: test_checkpoint_atomic)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / COMPLETE).write_text(f"{step}\n")
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_text_atomic(root / LATEST, name + "\n")
        _prune(root, keep_last)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    latest = read_latest(root)
    done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())
    for old in done[:-keep_last] if keep_last > 0 else []:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def read_latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    target = root / pointer.read_text().strip()
    return target if (target / COMPLETE).exists() else None


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """`auto` -> the latest complete checkpoint of output_dir (or None); `never` -> None; else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return read_latest(checkpoint_root(output_dir))
    path = Path(resume)
    if path.is_dir() and (path / LATEST).exists():
        path = read_latest(path) or path
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"checkpoint.resume='{resume}' is not a complete checkpoint (no {COMPLETE} file). "
                              "Fix: point at a step-* directory written by distthink, or use resume=auto")
    return path


def read_state(path: Path) -> dict:
    """The trainer state of a checkpoint, with `dp_size` (data-parallel ranks) filled in for checkpoints older than
    that field: world size / the saved config's distributed.sequence_parallel."""
    state = json.loads((path / STATE_FILE).read_text())
    if "dp_size" not in state and "world_size" in state:
        saved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
        sp = int(((saved or {}).get("distributed") or {}).get("sequence_parallel") or 1)
        state["dp_size"] = max(int(state["world_size"]) // sp, 1)
    return state


def load_checkpoint(accelerator, path: Path, universal: bool = False) -> dict:
    """Collective: restores model, optimizer and RNG states; returns the trainer state. `universal`: the ZeRO
    shards were saved at another world size, load DeepSpeed's universal form of them (engine/reshard.py)."""
    source = reshard.universal_dir(path, accelerator.num_processes, accelerator.is_main_process) if universal else path
    accelerator.load_state(str(source))
    state = read_state(path)
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


# ----------------------------------------------------------------------------------------------------
# Export: plain transformers / peft directories.
# ----------------------------------------------------------------------------------------------------
