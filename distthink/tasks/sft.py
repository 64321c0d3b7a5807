"""Reasoning-aware SFT (`task.name: sft`): chat samples through encode_chat, weighted LM loss over learned
tokens. The plainest task: everything it needs is the engine's."""

from __future__ import annotations

from typing import Callable

import torch

from distthink.config import Config
from distthink.data.parallel_encode import SplitEncoding
from distthink.engine import batching
from distthink.engine.lm_loss import LMHeadLoss
from distthink.models.attention import model_inputs


class SFTTask:
    """Reasoning-aware SFT: chat samples through encode_chat, weighted LM loss over learned tokens."""

    name = "sft"
    loss_keys: tuple[str, ...] = ("lm",)
    supports_sequence_parallel = True  # per-token batches only: a row may be cut anywhere

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare_tokenizer(self, tokenizer) -> None:
        """Plain SFT adds no tokens."""

    def split_encoding(self, split: str, tokenizer, source: str | None = None) -> SplitEncoding:
        return batching.chat_split_encoding(self.cfg, split, source)

    def collator(self, tokenizer) -> Callable[[list], dict]:
        return batching.make_collator(self.cfg, tokenizer)

    def wrap_model(self, model, tokenizer) -> torch.nn.Module:
        return LMHeadLoss(model, impl=self.cfg.loss.impl, chunk_size=self.cfg.loss.chunk_size)

    def forward(self, wrapped, batch: dict, attn_impl: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        loss_sum = wrapped(targets=batch["targets"], target_weights=batch["target_weights"],
                           segment_ids=batch["segment_ids"], **model_inputs(batch, attn_impl, dtype=dtype))
        return {"lm": loss_sum}

    def norms(self, batch: dict) -> dict[str, float]:
        return {"lm": float(batch["target_weight_sum"])}
