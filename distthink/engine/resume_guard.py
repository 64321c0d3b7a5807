"""A relaunch into an output dir that holds a checkpoint resumes it only if the run means the same thing.

The checkpoint keeps its run's config (config.yaml) and the digests of its data sources (trainer_state.json,
`data_digests`). Before any process group exists, the new config is compared with them:
- a change of meaning (the model, the LoRA shape, the task, the data sources or their bytes, how they are
  encoded, the seed) is refused with exit 2, naming the keys and the three ways out;
- any other change (max_steps, logging, eval frequency, learning rate, ...) passes with one info line.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from distthink.config import Config
from distthink.data.fingerprint import source_digest
from distthink.data.mixture import parse_sources
from distthink.engine.checkpoint import STATE_FILE
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

# Dotted keys (or prefixes ending in ".") whose change makes the checkpoint belong to another run.
MEANINGFUL = ("model.", "lora.", "task.", "data.train", "data.eval", "data.policy", "data.max_length",
              "data.max_train_samples", "data.max_eval_samples", "train.seed")
# Keys that are about this launch only, never reported.
IGNORED = ("checkpoint.resume", "checkpoint.allow_config_change")


def _local_digest(path: str) -> str | None:
    """sha256 of a local file's or folder's bytes; None for what the config's own words name (`bundled`, a hub id)."""
    return source_digest(path)["sha256"] if Path(path).exists() else None


def data_digests(cfg: Config) -> dict[str, str | dict | None]:
    """{split: digest of its source} for the run's data ({source name: digest} for a mixture, None where the
    config's own words name it)."""
    train = parse_sources(cfg.data.train)
    return {"train": _local_digest(train[0].path) if len(train) == 1 else
            {s.name: _local_digest(s.path) for s in train},
            "eval": _local_digest(cfg.data.eval) if cfg.data.eval else None}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.startswith(("data.policy", "task.options")):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _meaningful(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MEANINGFUL)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(meaningful, harmless) dotted keys whose value differs between two Config.to_dict() outputs."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in IGNORED)
    return [k for k in changed if _meaningful(k)], [k for k in changed if not _meaningful(k)]


def check_resume(cfg: Config, checkpoint: Path) -> None:
    """Refuse (ConfigError) a resume whose run means something else; log what else changed."""
    saved_cfg = checkpoint / "config.yaml"
    if not saved_cfg.is_file():
        return
    old = yaml.safe_load(saved_cfg.read_text()) or {}
    meaningful, harmless = config_changes(old, cfg.to_dict())
    state = json.loads((checkpoint / STATE_FILE).read_text()) if (checkpoint / STATE_FILE).is_file() else {}
    saved_digests = state.get("data_digests") or {}
    for split, digest in data_digests(cfg).items():
        before = saved_digests.get(split)
        if before and digest and before != digest and f"data.{split}" not in meaningful:
            meaningful.append(f"data.{split} (the file's content changed)")
    flat_old, flat_new = _flatten(old), _flatten(cfg.to_dict())
    if meaningful and not cfg.checkpoint.allow_config_change:
        shown = "; ".join(f"{k}: {flat_old.get(k.split(' ')[0])!r} -> {flat_new.get(k.split(' ')[0])!r}"
                          if " " not in k else k for k in meaningful[:6])
        raise ConfigError(f"{cfg.train.output_dir} holds a checkpoint of a different run ({checkpoint.name}); "
                          f"resuming it would mix two runs: {shown}. Fix: use a new train.output_dir, or "
                          "checkpoint.resume=never to start over here, or checkpoint.allow_config_change=true to "
                          "resume anyway")
    if meaningful:
        log.warning("resuming %s although %s changed (checkpoint.allow_config_change=true)", checkpoint,
                    ", ".join(meaningful))
    if harmless:
        log.info("resuming %s with changed settings: %s", checkpoint,
                 ", ".join(f"{k} {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in harmless))
