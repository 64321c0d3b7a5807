"""The LM objective and its exact global normalisation.

Definition. The loss of one optimizer step is

    L = sum over every micro-batch m of every rank r of sum_t w_t * CE_t   /   W,
    W = sum of w_t over the same tokens (the *global* weight total of the step).

It is not a mean per micro-batch, nor a mean per rank averaged over ranks: those weight a short
micro-batch's tokens more than a long one's (the grad-accumulation bug of several trainers).

How the gradient comes out exact. Before the first forward of a step, the trainer knows the GA
micro-batches of the step on its rank (they are prefetched) and all-reduces their weight sums, so every
rank knows W. Each micro-batch then back-propagates

    loss_m = (sum_t w_t * CE_t) * (world_size * grad_accum / W)

because both accelerate (non-DeepSpeed: loss / grad_accum; DDP: mean over ranks) and DeepSpeed (engine
backward scales by 1 / grad_accum; gradient all-reduce averages over ranks) divide by exactly
world_size * grad_accum. The accumulated, averaged gradient is then d/dθ [sum_m sum_t w_t CE_t / W]:
the gradient of L. tests/test_train_normalisation.py checks that 1x4x1, 1x1x4 and 2x1x2
(ranks x samples per micro-batch x GA) give the same loss and grad-norm trajectories.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distthink.logging_utils import get_logger

log = get_logger(__name__)
IGNORE_INDEX = -100


def weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * CE(logits_t, targets_t) in float32; positions with target -100 contribute 0.

    logits (N, V), targets (N,) long, weights (N,) float. Returns a 0-d float32 tensor.
    """
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights.float()).sum()


def naive_weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Independent reference for tests: explicit log-softmax gather, token by token semantics."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = targets != IGNORE_INDEX
    picked = logp[keep].gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    return (-(picked) * weights[keep].double()).sum().float()


def micro_batch_scale(global_weight_sum: float, world_size: int, grad_accum: int) -> float:
    """Factor applied to a micro-batch's weighted loss sum before backward (see module docstring)."""
    if global_weight_sum <= 0:
        return 0.0
    return world_size * grad_accum / global_weight_sum


def fused_op_available() -> bool:
    try:
        from distthink.ops import fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


class LMLossModel(torch.nn.Module):
    """Wraps a causal LM so that its forward returns the weighted loss *sum* of a packed micro-batch.

    This is the module handed to accelerate/DeepSpeed. Computing the loss inside the engine's forward
    matters under ZeRO-3: the fused loss reads `lm_head.weight` directly (it never calls lm_head), so
    the weight is registered as an external parameter of this module and DeepSpeed gathers it for the
    duration of this forward (and reduces its gradient) like any parameter of the module.

    impl="fused": decoder hidden states (N, H) x lm_head (V, H) through distthink.ops'
    fused linear cross-entropy (no (N, V) logits tensor). impl="hf": full logits, then weighted_ce_sum.
    """

    def __init__(self, model: torch.nn.Module, impl: str = "fused", chunk_size: int = 1024):
        super().__init__()
        self.model = model
        if impl == "fused" and not fused_op_available():
            log.info("loss.impl=fused requested but distthink.ops.fused_linear_cross_entropy is not available: "
                     "using logits + weighted cross-entropy (loss.impl=hf)")
            impl = "hf"
        self.impl = impl
        self.chunk_size = chunk_size
        from distthink.models.load import base_causal_lm, is_partitioned

        self._base = [base_causal_lm(model)]  # list: not registered as a second submodule
        if impl == "fused" and is_partitioned(model):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self._base[0].lm_head.weight)

    def forward(self, targets: torch.Tensor, target_weights: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """targets/target_weights (B, T); model_kwargs from distthink.data.packing.model_inputs.

        Returns the 0-d float32 weighted loss sum of the micro-batch (not normalised).
        """
        flat_t = targets.reshape(-1)
        flat_w = target_weights.reshape(-1)
        if self.impl == "hf":
            logits = self.model(**model_kwargs).logits
            return weighted_ce_sum(logits.reshape(-1, logits.shape[-1]), flat_t, flat_w)
        from distthink.ops import fused_linear_cross_entropy

        base = self._base[0]
        hidden = base.model(**model_kwargs).last_hidden_state
        head = base.lm_head
        # Under autocast (fp32 master weights, 16-bit compute) the head follows the hidden dtype: a
        # differentiable cast, so gradients still reach the fp32 weights.
        weight, bias = head.weight, head.bias
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat_t,
                                          bias=bias, token_weights=flat_w, reduction="sum",
                                          chunk_size=self.chunk_size)
