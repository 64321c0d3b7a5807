"""Inputs of the ThinkRec stage-3 tests, shared with the fusion-eval, explain, SLURM and device tests: a stage-1-like
PEFT adapter and a `rec group`-shaped folder, written from seeds (no training)."""

import json

import numpy as np
import pandas as pd
import torch

# eval prompts are rows of up to data.max_length = 1024 tokens: the attention sums of the tiny decoder are longer
EVAL_K = 18 * 1024

R, ALPHA = 4, 8


def write_adapter(out, seed=0, r=R, alpha=ALPHA):
    """A stage-1-like PEFT LoRA adapter for tiny-qwen3 (q_proj, v_proj), rank r, with non-zero A and B."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(2):
        for mod, d_out in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            t[f"{key}.lora_A.weight"] = torch.randn(r, 64, generator=g) * 0.1
            t[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.1
    out.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").save_pretrained(out)
    save_file(t, str(out / "adapter_model.safetensors"))
    return t


def write_groups(out, train_users, k=3, missing=()):
    """A `rec group`-shaped folder whose table sends the run's users to groups 0 and 1 only (group k-1 empty);
    users in `missing` are absent from the table (-> global adapter)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    users = sorted(set(train_users) - set(missing))
    group = [i % 2 for i in range(len(users))]  # alternate, so both groups 0 and 1 get samples
    users.append(10_000)  # one user of the last group, never in the data
    group.append(k - 1)
    pd.DataFrame({"user_id": users, "raw_user_id": [str(u) for u in users], "group": group,
                  "fitted": True}).to_parquet(out / "user_groups.parquet", index=False)
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(k, 8)).astype(np.float32)
    save_file({"centroids": centroids, "centroids_raw": centroids, "scaler_mean": np.zeros(8, np.float32),
               "scaler_scale": np.ones(8, np.float32)}, str(out / "groups.safetensors"))
    (out / "groups.json").write_text(json.dumps({"n_groups": k}))
