"""A two-objective task for the trainer's multi-objective normalisation test (imported by task.name).

The LM loss is split by the parity of each token's position *within its sample* into two objectives,
each normalised by its own global weight total: L = L_even / W_even + L_odd / W_odd. Position parity is
the same whatever the packing layout, so the loss must not depend on ranks x micro-batch x GA.
"""

import torch

from distthink.engine.lm_loss import weighted_ce_sum
from distthink.tasks.sft import SFTTask


class ParityWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, targets, target_weights, parity, **model_kwargs):
        logits = self.model(**model_kwargs).logits
        flat = logits.reshape(-1, logits.shape[-1])
        t, w, p = targets.reshape(-1), target_weights.reshape(-1), parity.reshape(-1)
        return {"even": weighted_ce_sum(flat, t, w * (p == 0)), "odd": weighted_ce_sum(flat, t, w * (p == 1))}


class ParityTask(SFTTask):
    loss_keys = ("even", "odd")

    def wrap_model(self, model, tokenizer):
        return ParityWrapper(model)

    def forward(self, wrapped, batch, attn_impl, dtype):
        from distthink.models.attention import model_inputs

        return wrapped(targets=batch["targets"], target_weights=batch["target_weights"],
                       parity=batch["position_ids"] % 2, **model_inputs(batch, attn_impl, dtype=dtype))

    def norms(self, batch):
        w, p = batch["target_weights"], batch["position_ids"] % 2
        return {"even": float((w * (p == 0)).sum()), "odd": float((w * (p == 1)).sum())}
