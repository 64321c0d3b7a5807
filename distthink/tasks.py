"""Tasks: what a recipe variant changes, so that every objective shares one training loop.

train.py owns the loop: distributed setup, the micro-batch plan, the exact global normalisation,
checkpoints, preemption, logging. A task owns what differs between reasoning SFT, ThinkRec and molecule
captioning:

- `prepare_tokenizer`: add placeholder tokens (`<UserID>`, `<|graph|>`, ...) before the model is built;
- `load_split`: encode a split into EncodedSamples (side inputs go into `meta`);
- `collator`: micro-batch dict (the packing contract in distthink/data/packing.py) plus side inputs;
- `wrap_model`: the module handed to accelerate/DeepSpeed. Any extra trainable module (projector,
  graph encoder) must be a submodule of it so that ZeRO partitions, reduces and checkpoints it;
- `forward`: run the wrapped module on one micro-batch and return a dict of *unnormalised loss sums*;
- `norms`: the matching local normalisers of a micro-batch.
- optional `save_extra(accelerator, wrapped, export_dir)`: collective, after the export, for side modules the
  LM export does not hold (the molecule task writes its graph encoder + projector there).
- optional `on_step_start(step, model, train_set, indices)`: called before a step's micro-batches are
  collated, with the unwrapped module and the train-set indices this rank uses in the step; it may replace
  `train_set[i]` for those indices (on-policy data: the molecule task's `think_mode: free` generates thoughts).

Normalisation contract. For each key k in `loss_keys`, the loss of an optimizer step is

    L_k = sum over all micro-batches of all ranks of sums[k]  /  sum over the same of norms[k]

and the step minimises sum_k L_k. The trainer all-reduces the norms of the step's micro-batches before
the first forward, so every term is normalised by its *global* total (see distthink/objectives.py). For
SFT there is one key, "lm": the weighted token loss over the global token-weight total. A task with a
second objective (ThinkRec's BCE on the "Yes" logit) adds a key normalised by its own count.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from distthink.config import Config
from distthink.errors import ConfigError


class SFTTask:
    """Reasoning-aware SFT: chat samples through encode_chat, weighted LM loss over learned tokens."""

    name = "sft"
    loss_keys: tuple[str, ...] = ("lm",)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare_tokenizer(self, tokenizer) -> None:
        """Plain SFT adds no tokens."""

    def load_split(self, split: str, tokenizer) -> list:
        from distthink import train_data

        return train_data.load_split(self.cfg, split, tokenizer, train_data.chat_policy(self.cfg))

    def collator(self, tokenizer) -> Callable[[list], dict]:
        from distthink import train_data

        return train_data.make_collator(self.cfg, tokenizer)

    def wrap_model(self, model, tokenizer) -> torch.nn.Module:
        from distthink.objectives import LMLossModel

        return LMLossModel(model, impl=self.cfg.loss.impl, chunk_size=self.cfg.loss.chunk_size)

    def forward(self, wrapped, batch: dict, attn_impl: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from distthink.data.packing import model_inputs

        loss_sum = wrapped(targets=batch["targets"], target_weights=batch["target_weights"],
                           **model_inputs(batch, attn_impl, dtype=dtype))
        return {"lm": loss_sum}

    def norms(self, batch: dict) -> dict[str, float]:
        return {"lm": float(batch["target_weight_sum"])}


# name -> "module:Class". Import lazily: a task's heavy dependencies load only when it runs.
TASKS: dict[str, str] = {
    "sft": "distthink.tasks:SFTTask",
    "thinkrec": "distthink.recsys.task:ThinkRecTask",
    "molecule": "distthink.molecule_task:MoleculeTask",
}


def make_task(cfg: Config) -> Any:
    """The task named by `task.name`: a name from TASKS, or `package.module:Class` for your own task."""
    import importlib

    name = cfg.task.name
    spec = TASKS.get(name, name)
    if ":" not in spec:
        raise ConfigError(f"task.name={name!r} is not a known task. Fix: use one of {sorted(TASKS)}, or "
                          "`package.module:Class` for a task of your own")
    module, cls = spec.split(":", 1)
    try:
        task_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"task.name={name!r} cannot be imported ({err}). Fix: check the module path and "
                          "class name, and that the module is importable (PYTHONPATH)") from None
    return task_cls(cfg)
