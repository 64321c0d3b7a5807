"""Tiny task worlds for the tests that stand in for the GPU (device harness, bf16 paths): prepared ThinkRec data,
a CF export, user groups and a stage-1 adapter, and the configs of each task's GPU-only path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from _thinkrec_inputs import write_adapter

CF_DIM = 8


def thinkrec_world(root: Path) -> dict:
    """prep/ (synthetic, prepared), cf/ (an MF export, CF_DIM), groups/ (`rec group` of it, 2 groups), stage1/ (a
    PEFT adapter of tiny-qwen3, r=8 on q_proj/v_proj)."""
    from distthink.tasks.thinkrec.cf import MF, CFConfig, CFResult, export_cf
    from distthink.tasks.thinkrec.grouping import GroupConfig, group_users
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    prep, cf, groups = root / "prep", root / "cf", root / "groups"
    prepare_synthetic(prep, reasons="template", n_users=20, n_items=40, min_per_user=10, max_per_user=20)
    n_u, n_i = len(pd.read_parquet(prep / "users.parquet")), len(pd.read_parquet(prep / "items.parquet"))
    torch.manual_seed(0)
    export_cf(CFResult(model=MF(n_u, n_i, CF_DIM), config=CFConfig(dim=CF_DIM), best_epoch=0, valid_auc=0.5), cf, prep)
    group_users(cf, groups, GroupConfig(n_groups=2, seed=0, plots=False))
    write_adapter(root / "stage1", r=8, alpha=16)  # the LoRA shape of configs/thinkrec/smoke.yaml (ThinkRec's)
    return {"root": root, "prep": prep, "cf": cf, "groups": groups, "stage1": root / "stage1"}


def thinkrec_overrides(world: dict, variant: str) -> tuple[str, list[str]]:
    """(config file, overrides) of a ThinkRec run: `text` (stage 1), `ids` (stage 2: projector on CF vectors,
    stage-1 adapter frozen), `hard` / `soft` (stage 3, MoLoRA with hard or entropy gates)."""
    data = [f"data.train={world['prep'] / 'train.parquet'}", "data.eval=null", "task.options.max_train_samples=8"]
    if variant == "text":
        return "configs/thinkrec/smoke.yaml", data
    if variant == "ids":
        return "configs/thinkrec/smoke.yaml", data + [
            "task.options.prompt_mode=ids", f"task.options.cf_export={world['cf']}",
            f"task.options.init_adapter={world['stage1']}", "task.options.freeze_lora=true"]
    return "configs/thinkrec/stage3_smoke.yaml", data + [
        f"task.options.molora.groups_dir={world['groups']}", f"task.options.molora.init_adapter={world['stage1']}",
        f"task.options.molora.gate={variant}", f"task.options.cf_export={world['cf']}"]
