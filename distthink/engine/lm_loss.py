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
the gradient of L. tests/train/test_train_normalisation.py checks that 1x4x1, 1x1x4 and 2x1x2
(ranks x samples per micro-batch x GA) give the same loss and grad-norm trajectories.

The LM-head loss part. `LMHeadLoss` is the one module every task's wrapper is built on (torchtune's "the loss
adapts to the model's output", not one copy per wrapper). It owns what touches the head: the fused vs hf
branch, the head's registration as an external ZeRO-3 parameter, the dtype cast, per-token weights, the
dynamic "after </think>" weights and the selected-logit statistics (ThinkRec's Yes/No logits). A task adds
its inputs (injected embeddings) and its other objectives around `head_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distthink.data.types import IGNORE_INDEX
from distthink.errors import ConfigError
from distthink.models.load import base_causal_lm
from distthink.ops import fused_linear_cross_entropy
from distthink.zero3 import register_external_parameter


def weighted_ce_terms(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) float32 w_t * CE(logits_t, targets_t); positions with target -100 are 0.

    logits (N, V), targets (N,) long, weights (N,) float."""
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return ce * weights.float()


def weighted_ce_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * CE(logits_t, targets_t) in float32 (a 0-d tensor); see weighted_ce_terms."""
    return weighted_ce_terms(logits, targets, weights).sum()


def loss_parts(module: torch.nn.Module) -> list["LMHeadLoss"]:
    """The LMHeadLoss modules inside a (task-wrapped) model."""
    return [m for m in module.modules() if isinstance(m, LMHeadLoss)]


def segment_sums(terms: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(S,) float64 sums of the per-token `terms` (N,) by segment (sample j of the micro-batch = segment j;
    padding, segment -1, is left out), detached: what the trainer reports per mixture source."""
    seg = segment_ids.reshape(-1).to(terms.device)
    real = seg >= 0
    n = int(seg[real].max()) + 1 if bool(real.any()) else 0
    return torch.zeros(n, dtype=torch.float64, device=terms.device).index_add_(0, seg[real],
                                                                              terms.detach()[real].double())


def micro_batch_scale(global_weight_sum: float, world_size: int, grad_accum: int) -> float:
    """Factor applied to a micro-batch's weighted loss sum before backward (see module docstring)."""
    if global_weight_sum <= 0:
        return 0.0
    return world_size * grad_accum / global_weight_sum


def head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(hidden, weight, bias) in the dtype the head's GEMMs should run in.

    Under autocast (fp32 master weights, 16-bit compute) that is the autocast dtype: the fused op switches
    autocast off inside and computes in its inputs' dtype, and Qwen3's final RMSNorm returns fp32 under autocast,
    so without this cast the three V x H GEMMs of the loss would run in fp32 (several times slower on a GPU, and
    not what `distthink plan` models). Outside autocast the head follows the hidden states' dtype. The casts are
    differentiable: the gradients reach the fp32 weights; the op accumulates in fp32 either way."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    return (hidden.to(dtype), weight.to(dtype),
            None if bias is None else bias.to(dtype))


class LMHeadLoss(torch.nn.Module):
    """A causal LM whose forward returns the weighted LM loss *sum* of a packed micro-batch (see module doc).

    This is the module handed to accelerate/DeepSpeed (task wrappers subclass it and add their side modules as
    submodules). Computing the loss inside the engine's forward matters under ZeRO-3: the fused loss reads
    `lm_head.weight` directly (it never calls lm_head), so the weight is registered as an external parameter
    of this module and DeepSpeed gathers it for the duration of this forward and reduces its gradient.

    impl="fused": decoder hidden states (N, H) x lm_head (V, H) through distthink.ops' fused linear
    cross-entropy (no (N, V) logits tensor). impl="hf": full logits, then weighted_ce_sum (the reference).
    dynamic ("argmax" | "soft") with think_end_id: the fused op's dynamic weights (a sample's tokens count only
    after the position where the model itself predicts `</think>`); needs impl="fused".
    """

    # distthink.engine.sequence_parallel.ThinkState when the rows are sharded (set by the trainer), else None
    sequence_parallel = None
    # Set by the trainer for a mixture: each forward keeps the (S,) detached sums per sample of the micro-batch of
    # w * CE (`segment_loss_sums`) and of the weights w it was given (`segment_weight_sums`); the loss is then the
    # sum of the per-token terms (reduction "none"), which equals the fused sum up to float32 rounding.
    track_segments = False
    segment_loss_sums: torch.Tensor | None = None
    segment_weight_sums: torch.Tensor | None = None

    def __init__(self, model: torch.nn.Module, *, impl: str = "fused", chunk_size: int = 1024,
                 dynamic: str | None = None, think_end_id: int | None = None):
        super().__init__()
        if impl not in ("fused", "hf"):
            raise ConfigError(f"loss.impl={impl!r}. Fix: use fused or hf")
        if dynamic and impl != "fused":
            raise ConfigError("dynamic think weights need the fused loss. Fix: set loss.impl=fused")
        self.model = model
        self.impl, self.chunk_size = impl, chunk_size
        self.dynamic, self.think_end_id = dynamic, think_end_id
        self._base = [base_causal_lm(model)]  # a list: not registered as a second submodule
        if impl == "fused":
            register_external_parameter(self, self._base[0].lm_head.weight)

    @property
    def base(self) -> torch.nn.Module:
        """The plain transformers causal LM (inside PEFT), whose `.model` is the decoder and `.lm_head` the head."""
        return self._base[0]

    def hidden_states(self, **model_kwargs) -> torch.Tensor:
        """(B, T, H) final hidden states of the decoder (LoRA layers included: PEFT injects them in place)."""
        return self.base.model(**model_kwargs).last_hidden_state

    def head_loss(self, targets: torch.Tensor, target_weights: torch.Tensor, model_kwargs: dict, *,
                  segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  stats_token_ids: list[int] | None = None, stats_rows: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the decoder on `model_kwargs` and return (weighted loss sum, selected logits).

        targets/target_weights (B, T); segment_ids/position_ids (B, T) for the dynamic weights; with
        stats_token_ids (k ids) and stats_rows (R,) flat row indices, also the (R, k) float32 logits of those
        tokens at those rows (else None). The loss is a 0-d float32 tensor, not normalised.
        """
        flat_t, flat_w = targets.reshape(-1), target_weights.reshape(-1)
        want_stats = stats_token_ids is not None
        track = self.track_segments and segment_ids is not None
        self.segment_loss_sums = None
        self.segment_weight_sums = segment_sums(flat_w, segment_ids) if track else None
        if self.impl == "hf":
            logits = self.model(**model_kwargs).logits
            flat = logits.reshape(-1, logits.shape[-1])
            selected = flat.index_select(0, stats_rows)[:, list(stats_token_ids)].float() if want_stats else None
            terms = weighted_ce_terms(flat, flat_t, flat_w)
            if track:
                self.segment_loss_sums = segment_sums(terms, segment_ids)
            return terms.sum(), selected
        hidden = self.hidden_states(**model_kwargs)
        head = self.base.lm_head
        hidden, weight, bias = head_operands(hidden, head.weight, head.bias)
        extra = {}
        if self.dynamic and self.sequence_parallel is not None:  # </think> may lie on another rank's shard
            flat_w = self.sequence_parallel.dynamic_weights(hidden, weight, bias, targets, target_weights, segment_ids,
                                                            self.dynamic, self.think_end_id, self.chunk_size)
        elif self.dynamic:
            extra = dict(dynamic=self.dynamic, think_end_id=self.think_end_id,
                         segment_ids=segment_ids.reshape(-1), position_ids=position_ids.reshape(-1))
        if want_stats:
            extra.update(return_stats=True, stats_token_ids=list(stats_token_ids), stats_rows=stats_rows)
        out = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat_t, bias=bias,
                                         token_weights=flat_w, reduction="none" if track else "sum",
                                         chunk_size=self.chunk_size, **extra)
        loss, stats = out if want_stats else (out, None)
        if track:
            self.segment_loss_sums = segment_sums(loss, segment_ids)
            loss = loss.sum()
        return loss, stats.selected_logits if want_stats else None

    def forward(self, targets: torch.Tensor, target_weights: torch.Tensor, segment_ids: torch.Tensor | None = None,
                **model_kwargs) -> torch.Tensor:
        """targets/target_weights (B, T); model_kwargs from distthink.models.attention.model_inputs; segment_ids
        (B, T) for the per-sample sums of `track_segments`.

        Returns the 0-d float32 weighted loss sum of the micro-batch (not normalised).
        """
        loss, _ = self.head_loss(targets, target_weights, model_kwargs, segment_ids=segment_ids)
        return loss
