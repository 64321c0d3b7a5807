"""The final export of a run: the adapter or the consolidated full model (merged LoRA), loadable by plain
transformers / peft, gathered from ZeRO-3 partitions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from distthink.engine.distributed import barrier
from distthink.errors import CheckpointError
from distthink.logging_utils import get_logger
from distthink.models.load import base_causal_lm

log = get_logger(__name__)


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
    check_nonempty(tmp)
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


def check_nonempty(path: Path) -> None:
    """Refuse an export without tensors, or with empty ones (ZeRO-3 shards saved without gathering)."""
    files = list(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"export {path} has no .safetensors file")
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys = list(fh.keys())
            if not keys or any(fh.get_slice(k).get_shape() in ([0], []) for k in keys):
                raise CheckpointError(f"export {f} holds empty tensors (ZeRO-3 shards saved without gathering)")
