"""Observation hooks for tests: environment variables that make a run write down what it did. Unset, a no-op.

They let the multi-process tests check what a run cannot show in its metrics (the faults that make a run fail on
purpose are distthink.engine.faults):

- DISTTHINK_PROBE_SAMPLES=DIR     each data-parallel rank (the first rank of its sequence-parallel group) appends
                                  one JSON line per optimizer step to DIR/samples-dp<rank>.jsonl:
                                  {"step", "epoch", "dp_rank", "dp_size", "ids": the sample indices it trained on};
- DISTTHINK_PROBE_OPTIMIZER=DIR   DeepSpeed runs: at every checkpoint save and after a resume's load, rank 0 writes
                                  DIR/<save|load>-step<N>.safetensors with the full (gathered) fp32 master weights
                                  and Adam moments of every trainable parameter (`<name>/fp32|exp_avg|exp_avg_sq`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from distthink.engine.sequence_parallel import Layout


def samples_seen(step: int, epoch: int, sp: Layout, ids: list[int]) -> None:
    where = os.environ.get("DISTTHINK_PROBE_SAMPLES")
    if not where or sp.rank != 0:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    record = {"step": step, "epoch": epoch, "dp_rank": sp.dp_rank, "dp_size": sp.dp_size, "ids": [int(i) for i in ids]}
    with open(Path(where) / f"samples-dp{sp.dp_rank}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def optimizer_state(event: str, step: int, engine) -> None:
    """Collective under ZeRO-3 (every rank gathers each parameter's pieces)."""
    where = os.environ.get("DISTTHINK_PROBE_OPTIMIZER")
    if not where or not hasattr(engine, "zero_optimization_stage"):  # DeepSpeed engines only
        return
    # deepspeed only in DeepSpeed runs (heavy import); this hook is for tests only
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        tensors[f"{name}/fp32"] = safe_get_full_fp32_param(param)
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(where).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float32).cpu().contiguous() for k, v in tensors.items() if v is not None},
                  str(Path(where) / f"{event}-step{step:08d}.safetensors"))
