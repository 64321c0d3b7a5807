"""Reference weighted cross-entropy: explicit log-softmax gather in float64, token by token semantics."""

import torch

IGNORE_INDEX = -100  # written here on purpose: a reference must not import the value it checks


def naive_weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * -log softmax(logits_t)[targets_t] over targets != -100, computed in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != IGNORE_INDEX
    picked = logp[keep].gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    return (-(picked) * weights[keep].double()).sum().float()
