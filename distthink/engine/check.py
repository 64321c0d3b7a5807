"""`distthink check`: validate a checkpoint or an export (files, tensors, shapes, loads, a generation smoke)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from distthink.errors import CheckpointError
from distthink.logging_utils import get_logger

log = get_logger(__name__)
from distthink.engine.checkpoint import COMPLETE, LATEST, STATE_FILE, read_latest
from distthink.engine.export import check_nonempty

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
            for key in ("step", "epoch", "micro_index", "scheduler", "run_totals"):
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
        check_nonempty(p)
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
