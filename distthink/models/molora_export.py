"""Export / reload of MoLoRA models as standard PEFT adapter folders + ``molora.json``.

Layout written by `export_molora(model, out)`::

    out/
      molora.json                  format, K, r, lora_alpha, target_modules, adapters, group map, gate
      expert_0/ ... expert_{K-1}/  one PEFT LoRA adapter per user group
      global/                      the global adapter (gate fallback)
      user_groups.parquet          copied from the groups folder when one is given (user -> group)

Each adapter folder is what ``PeftModel.save_pretrained`` writes for a plain LoRA: ``adapter_config.json``
(written by peft's own ``LoraConfig.save_pretrained``) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_{A,B}.weight``. So any multi-LoRA server, or plain
``PeftModel.from_pretrained(base, out / "expert_0")``, serves one adapter, and the output of that model
equals the MoLoRA model with a one-hot gate on that adapter. ``molora.json``::

    {"format": "distthink-molora", "version": 1, "num_experts": K, "r": r, "lora_alpha": a,
     "lora_dropout": p, "target_modules": [...], "modules": [full module paths],
     "adapters": ["expert_0", ..., "global"],        # index e = column e of the gates
     "group_to_adapter": {"0": "expert_0", ...}, "global_adapter": "global",
     "gate": {"tau", "expert_margin", "entropy_frac", "space" (raw | standardised), "centroids" (K x d, in that
              space), "scaler_mean", "scaler_scale", "rule"} or null,
     "user_groups": "user_groups.parquet" or null, "base_model_name_or_path": ...}

Under ZeRO-3 every rank must call `export_molora` (parameters are gathered); rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from distthink._deprecated import moved
from distthink.errors import CheckpointError, ConfigError
from distthink.logging_utils import get_logger
from distthink.models.molora import MoLoRALinear, _read_adapter_folder, apply_molora, molora_layers
from distthink.zero3 import gathered

log = get_logger(__name__)
FORMAT = "distthink-molora"
VERSION = 1


def adapter_names(num_experts: int) -> list[str]:
    """Folder name of each adapter, by gate column: expert_0..expert_{K-1}, global."""
    return [f"expert_{k}" for k in range(num_experts)] + ["global"]


def _is_writer() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _layer_spec(layers: dict[str, MoLoRALinear]) -> dict:
    if not layers:
        raise ConfigError("the model has no MoLoRA layers. Fix: apply_molora (or load_molora) first")
    specs = {(m.num_experts, m.r, m.alpha, m.dropout_p) for m in layers.values()}
    if len(specs) != 1:
        raise ConfigError(f"MoLoRA layers disagree on (K, r, alpha, dropout): {sorted(specs)}")
    k, r, alpha, dropout = specs.pop()
    return {"num_experts": k, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "modules": sorted(layers)}


def export_molora(model: nn.Module, out_dir: str | Path, gate=None, groups_dir: str | Path | None = None,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write every expert and the global adapter as PEFT adapter folders + molora.json (layout above).

    gate: the task's gate rule to store, any object with `num_experts` and `to_json()` (ThinkRec's
    EntropyGate: centroids, scaler, tau, thresholds), or None.
    groups_dir: a folder holding user_groups.parquet (the user -> group map), copied next to the adapters.
    """
    layers = molora_layers(model)
    spec = _layer_spec(layers)
    if gate is not None and gate.num_experts != spec["num_experts"]:
        raise ConfigError(f"the gate has {gate.num_experts} centroids but the model has {spec['num_experts']} experts")
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "_name_or_path", None) or None
    names = adapter_names(spec["num_experts"])
    out = Path(out_dir)
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for path, layer in layers.items():
        with gathered([layer.lora_A, layer.lora_B]):
            for e, name in enumerate(names):
                a, b = layer.adapter_weights(e)
                key = f"base_model.model.{path}"
                tensors[name][f"{key}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
                tensors[name][f"{key}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
    if not _is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    alpha = spec["lora_alpha"]
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # servers (vLLM, ...) expect an int alpha
    lcfg = LoraConfig(r=spec["r"], lora_alpha=alpha, lora_dropout=spec["lora_dropout"],
                      target_modules=spec["target_modules"], bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name_or_path)
    for name in names:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        lcfg.save_pretrained(str(d))
        save_file(tensors[name], str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    user_groups = None
    if groups_dir is not None:
        src = Path(groups_dir) / "user_groups.parquet"
        if src.is_file():
            shutil.copyfile(src, out / "user_groups.parquet")
            user_groups = "user_groups.parquet"
    k = spec["num_experts"]
    meta = {"format": FORMAT, "version": VERSION, **spec, "adapters": names,
            "group_to_adapter": {str(g): names[g] for g in range(k)}, "global_adapter": names[k],
            "gate": None, "user_groups": user_groups, "base_model_name_or_path": base_model_name_or_path}
    if gate is not None:
        meta["gate"] = gate.to_json()
    tmp = out / "molora.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / "molora.json")
    log.info("molora: exported %d experts + global adapter (%d modules) to %s", k, len(layers), out)
    return out


def read_molora_json(folder: str | Path) -> dict:
    p = Path(folder) / "molora.json"
    if not p.is_file():
        raise CheckpointError(f"{folder}: no molora.json. Fix: pass the folder written by export_molora")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{p}: format {meta.get('format')!r} v{meta.get('version')} is not "
                              f"{FORMAT!r} v{VERSION}")
    return meta


def load_molora_adapters(model: nn.Module, folder: str | Path, dropout: float | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a MoLoRA model from an export: apply_molora on the *plain* base model, then load every adapter.

    Returns (model, molora.json). The stored gate (`meta["gate"]`) is the task's to rebuild (ThinkRec:
    distthink.tasks.thinkrec.gate.load_molora returns its EntropyGate).
    dropout: LoRA input dropout for further training (default: the exported value).
    """
    folder = Path(folder)
    meta = read_molora_json(folder)
    model = apply_molora(model, meta["num_experts"], r=meta["r"], alpha=meta["lora_alpha"],
                         dropout=meta["lora_dropout"] if dropout is None else dropout,
                         target_modules=meta["target_modules"])
    layers = molora_layers(model)
    if sorted(layers) != sorted(meta["modules"]):
        missing = sorted(set(meta["modules"]) ^ set(layers))
        raise CheckpointError(f"{folder}: the model's targeted modules differ from the export's ({missing[:3]}...). "
                              "Fix: load onto the same base architecture")
    for e, name in enumerate(meta["adapters"]):
        acfg, weights = _read_adapter_folder(folder / name)
        if int(acfg["r"]) != meta["r"] or float(acfg["lora_alpha"]) != float(meta["lora_alpha"]):
            raise CheckpointError(f"{folder / name}: r/lora_alpha differ from molora.json")
        if set(weights) != set(layers):
            raise CheckpointError(f"{folder / name}: adapter modules differ from molora.json")
        for path, layer in layers.items():
            a, b = weights[path]
            layer.set_adapter_weights(e, a, b)
    return model, meta


__getattr__ = moved(__name__, {"load_molora": "distthink.tasks.thinkrec.gate:load_molora"})
