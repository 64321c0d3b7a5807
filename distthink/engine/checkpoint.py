"""Atomic, resumable checkpoints; consolidated export; checkpoint validation.

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
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from distthink.engine.distributed import barrier
from distthink.errors import CheckpointError
from distthink.logging_utils import get_logger
from distthink.models.load import base_causal_lm

log = get_logger(__name__)

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
LATEST = "latest"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
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
        fault = os.environ.get("DISTTHINK_FAULT_SAVE_SLEEP_AT", "")  # "STEP:SECONDS", test hook
        if fault and int(fault.split(":")[0]) == step:  # a window to kill mid-save (test_checkpoint_atomic)
            log.info("DISTTHINK_FAULT_SAVE_SLEEP_AT: sleeping %ss inside the save of %s", fault.split(":")[1], name)
            time.sleep(float(fault.split(":")[1]))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, name + "\n")
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


def load_checkpoint(accelerator, path: Path) -> dict:
    """Collective: restores model, optimizer and RNG states; returns the trainer state."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


# ----------------------------------------------------------------------------------------------------
# Export: plain transformers / peft directories.
# ----------------------------------------------------------------------------------------------------

def export_model(accelerator, wrapped, tokenizer, out_dir: str | os.PathLike, kind: str, dtype,
                 from_config: bool = False) -> Path | None:
    """Collective. kind: `adapter` (PEFT adapter) or `full` (consolidated safetensors in `dtype`).

    Under ZeRO-3 `accelerator.get_state_dict` gathers the partitioned weights to rank 0 (needs
    `stage3_gather_16bit_weights_on_model_save: true`, set in ds_configs/zero3*.json), so the files
    are complete, never the empty local shards.
    """
    out = Path(out_dir)
    full_sd = accelerator.get_state_dict(wrapped)  # every rank participates; rank 0 gets the tensors
    if not accelerator.is_main_process:
        barrier()
        return None
    inner = accelerator.unwrap_model(wrapped).model  # LMHeadLoss.model: PeftModel or the causal LM
    prefix = "model."
    sd = {k[len(prefix):]: v for k, v in full_sd.items() if k.startswith(prefix)}
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "adapter":
        inner.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        if from_config:
            # The base was built from a config (random init): ship it, or the adapter loads onto nothing.
            base_sd = {k.replace("base_model.model.", "", 1).replace(".base_layer.", "."): v.to(dtype)
                       for k, v in sd.items() if "lora_" not in k}
            base_causal_lm(inner).save_pretrained(str(tmp / "base_model"), state_dict=base_sd,
                                                  safe_serialization=True)
    else:
        base = base_causal_lm(inner)
        if hasattr(inner, "peft_config"):  # LoRA run exported as a full model: merge B @ A into W
            sd = merge_lora_state_dict(sd, inner.peft_config["default"])
        sd = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in sd.items()}
        base.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _check_nonempty(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("exported %s to %s", "PEFT adapter" if kind == "adapter" else "full model", out)
    barrier()
    return out


def merge_lora_state_dict(sd: dict, lora_cfg) -> dict:
    """PeftModel state dict (keys base_model.model.<...>.base_layer.weight / lora_A / lora_B) -> the plain
    model's state dict with W + (alpha / r) * B @ A merged, computed in fp32 on the gathered tensors
    (works the same under ZeRO-3, where the adapter-wrapped model cannot merge its partitioned layers).
    """

    if getattr(lora_cfg, "use_rslora", False) or getattr(lora_cfg, "use_dora", False):
        raise CheckpointError("merging rsLoRA/DoRA adapters is not supported. Fix: checkpoint.export=adapter")
    scale = lora_cfg.lora_alpha / lora_cfg.r
    out = {}
    for key, value in sd.items():
        if "lora_" in key:
            continue
        plain = key.replace("base_model.model.", "", 1)
        if ".base_layer." in plain:
            stem = key.rsplit(".base_layer.", 1)[0]
            plain = plain.replace(".base_layer.", ".")
            if key.endswith(".base_layer.weight"):
                a, b = sd[f"{stem}.lora_A.default.weight"], sd[f"{stem}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[plain] = value
    return out


def _check_nonempty(path: Path) -> None:
    files = list(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"export {path} has no .safetensors file")
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys = list(fh.keys())
            if not keys or any(fh.get_slice(k).get_shape() in ([0], []) for k in keys):
                raise CheckpointError(f"export {f} holds empty tensors (ZeRO-3 shards saved without gathering)")


# ----------------------------------------------------------------------------------------------------
# Validation (`distthink check`).
# ----------------------------------------------------------------------------------------------------

def check_path(path: str | os.PathLike, generate: bool = True) -> list[str]:
    """Problems found in a training checkpoint or an export directory ([] = healthy).

    Export dirs (adapter_config.json or config.json + safetensors) are loaded with plain
    transformers/peft, their tensors checked for emptiness/NaN, and a short generation is run.
    """
    p = Path(path)
    problems: list[str] = []
    if not p.exists():
        return [f"{p} does not exist. Fix: pass a step-* checkpoint, a checkpoints/ dir or an export dir"]
    if (p / "checkpoints" / LATEST).exists():
        p = p / "checkpoints"  # an output_dir
    if (p / LATEST).exists() and not (p / STATE_FILE).exists():  # a checkpoints/ root
        latest = read_latest(p)
        if latest is None:
            return [f"{p / LATEST} points at an incomplete checkpoint. Fix: delete the pointer or resume from "
                    "an older step-* directory"]
        p = latest
    if (p / STATE_FILE).exists() or p.name.startswith(("step-", ".tmp-step-")):
        if not (p / COMPLETE).exists():
            problems.append(f"{p}: no {COMPLETE} marker: the save was interrupted. Fix: resume from the "
                            "checkpoint named in checkpoints/latest")
        for name in (STATE_FILE, "config.yaml"):
            if not (p / name).exists():
                problems.append(f"{p}: missing {name}")
        if not list(p.glob("random_states_*.pkl")):
            problems.append(f"{p}: no random_states_*.pkl (RNG) files: resume would not be exact")
        weights = list(p.rglob("*.safetensors")) + list(p.rglob("*.bin")) + list(p.rglob("*model_states.pt"))
        if not weights:
            problems.append(f"{p}: no model weights found")
        if not problems:
            state = json.loads((p / STATE_FILE).read_text())
            for key in ("step", "epoch", "micro_index", "scheduler", "learned_tokens_total"):
                if key not in state:
                    problems.append(f"{p / STATE_FILE}: missing '{key}'")
        export = p.parent.parent / "export"
        if not problems and export.exists():
            problems += check_export(export, generate=generate)
        return problems
    return check_export(p, generate=generate)


def check_export(p: Path, generate: bool = True) -> list[str]:
    problems: list[str] = []
    try:
        _check_nonempty(p)
    except CheckpointError as err:
        return [str(err)]
    try:
        if (p / "adapter_config.json").exists():
            pcfg = PeftConfig.from_pretrained(str(p))
            base_path = pcfg.base_model_name_or_path
            base_dir = Path(base_path) if base_path else None
            if (p / "base_model" / "config.json").exists():
                base_dir = p / "base_model"  # exported with the adapter (model built from config)
            if base_dir is None or not (base_dir / "config.json").exists():
                return [f"{p}: adapter's base model '{base_path}' is not a local directory. Fix: download it "
                        "or check on a machine that has it"]
            base = AutoModelForCausalLM.from_pretrained(str(base_dir))
            model = PeftModel.from_pretrained(base, str(p))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p))
        for name, t in model.state_dict().items():
            if torch.is_floating_point(t) and not torch.isfinite(t).all():
                problems.append(f"{p}: tensor {name} has NaN/Inf values")
        if generate and not problems:
            tok = AutoTokenizer.from_pretrained(str(p))
            ids = tok("Hello", return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
            if out.shape[1] <= ids.shape[1]:
                problems.append(f"{p}: sanity generation produced no token")
    except Exception as err:  # report, do not crash: this is a diagnostic command
        problems.append(f"{p}: cannot be loaded by plain transformers/peft: {type(err).__name__}: {err}")
    return problems
