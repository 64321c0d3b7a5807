"""Ulysses sequence parallelism for the recipe: one long packed row on N ranks, with the exact loss.

`distributed.sequence_parallel: N` (N > 1, DeepSpeed ZeRO-2/3) splits every micro-batch row into N contiguous
shards. Each rank runs the decoder on its shard; in every attention layer DeepSpeed's `UlyssesSPAttentionHF`
(ALST, registered by accelerate's `ParallelismConfig(sp_backend="deepspeed")`) exchanges sequence for heads with
an all-to-all, so attention sees the whole row; distthink/models/ulysses.py gives it the packed rows' sample
boundaries. The rest of this module is what makes the *training signal* the SP=1 run's:

Layout. Ranks [g*N, (g+1)*N) form SP group g (DeepSpeed's parallel_state_sp layout), the data-parallel size is
DP = world / N and rank r is DP rank r // N, SP rank r % N. The sampler plans micro-batches for DP ranks; the N
ranks of a group collate the same micro-batch and `shard` keeps their slice, padded at the end so that N divides
the row (padding is its own attention block, never learned: packing's batch contract).

Normalisation. `shard` recomputes a shard's normaliser (weight total, learned tokens) from its own slice, so the
trainer's all-reduce over *all* ranks counts every token once: W is summed over SP x DP x GA. Each rank
back-propagates its shard's loss sum; its gradient also receives, through the all-to-alls' backward, what the
other shards' losses send back, so the gradients of an SP group sum to the gradient of its rows. DeepSpeed then
sums over all ranks and divides by a stage-dependent number (`gradient_divisor`: DP under ZeRO-1/2, the world
size under ZeRO-3), which the trainer's scale DP-or-world * GA / W undoes exactly; the step loss and gradient
equal the SP=1 run's (tests/train/test_sequence_parallel_train.py, with leaky variants that fail).

Think state. The dynamic "after </think>" weights (distthink/ops/flce.py) decide a sample's multiplier from the
model's argmax over the sample's whole learned region, which may span shards: a shard's rows are masked up to a
`</think>` predicted on an earlier shard, or kept because a later shard predicts it... `dynamic_weights` gathers,
per sample, the first hit position and the soft mode's softmax statistics (max logit, sum of exponentials) over
the SP group, and gives each shard exactly the multipliers of distthink.ops.flce (and tests/references/flce.py):
argmax: 0 up to and including the sample's first hit, 1 after; soft: the softmax over the sample's whole region
of the `</think>` logit, cumulated (an exclusive prefix over the earlier shards, then the shard's own cumsum);
1 everywhere for a sample that never predicts `</think>`. The shard's fused loss then runs with static weights
x multiplier (the multiplier is a constant in both paths, so the loss and its gradient are the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate.utils import DeepSpeedSequenceParallelConfig, ParallelismConfig
from transformers import AutoConfig

from distthink.config import Config, resolve_attention, zero_stage_of
from distthink.data.types import IGNORE_INDEX
from distthink.engine import faults
from distthink.engine.lm_loss import LMHeadLoss
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.load import base_causal_lm, build_model_config
from distthink.models.ulysses import install_packed_core

log = get_logger(__name__)

TASK_FLAG = "supports_sequence_parallel"  # a task class attribute: True when its batches may be sharded


@dataclass(frozen=True)
class Layout:
    """Where one rank sits: SP group size and rank, DP size and rank."""

    size: int = 1
    rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def layout(world: int, rank: int, size: int) -> Layout:
    """SP groups of consecutive ranks, as DeepSpeed's parallel_state_sp builds them."""
    if size < 1 or world % size:
        raise ConfigError(f"distributed.sequence_parallel={size} does not divide the {world} launched processes. "
                          "Fix: launch a multiple of it, or change distributed.sequence_parallel")
    return Layout(size=size, rank=rank % size, dp_size=world // size, dp_rank=rank // size)


def gradient_divisor(cfg: Config, lay: Layout) -> int:
    """What DeepSpeed divides the summed gradients by, which the trainer's micro-batch scale must undo (it
    replaces the world size in distthink.engine.lm_loss.micro_batch_scale). Without SP: the world size.

    With SP, DeepSpeed 0.19 sums the gradients over all ranks but divides by a different number per ZeRO stage:
    ZeRO-1/2 by world / N = DP (stage_1_and_2.py: `div_(dp_world_size / sequence_parallel_size)` on every path),
    ZeRO-3 by the world size (its default reduce-scatter, stage3.py `__avg_scatter_grads` ->
    reduce_scatter_coalesced, applies no SP factor; its contiguous all-reduce path does, which is why
    distthink.config refuses ZeRO-3 with reduce_scatter=false under SP). tests/train/test_sequence_parallel_train.py
    fails if a DeepSpeed release changes either."""
    if not lay.enabled:
        return lay.dp_size
    zero3 = zero_stage_of(cfg) == 3
    if faults.sp_leak("scale"):
        zero3 = not zero3
    return lay.dp_size * lay.size if zero3 else lay.dp_size


def model_config(cfg: Config, tokenizer):
    """The transformers config of the run's model, without building the model (for the shape checks)."""
    if cfg.model.name_or_path:
        return AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    return build_model_config(cfg, tokenizer)


def run_layout(cfg: Config, task, tokenizer, world: int, rank: int) -> Layout:
    """Check what SP needs from the launch, the task and the model's shape, before the model is built, and
    return this rank's layout (Layout(1, 0, world, rank) when SP is off)."""
    n = cfg.distributed.sequence_parallel
    if n == 1:
        return Layout(size=1, rank=0, dp_size=world, dp_rank=rank)
    if not getattr(task, TASK_FLAG, False):
        raise ConfigError(f"task.name={cfg.task.name!r} does not support distributed.sequence_parallel (its side "
                          "inputs are placed over whole rows). Fix: set distributed.sequence_parallel=1, or use a "
                          "task that declares supports_sequence_parallel (sft)")
    if world % n:
        raise ConfigError(f"distributed.sequence_parallel={n} does not divide the {world} launched processes. "
                          f"Fix: launch a multiple of {n} processes, or set distributed.sequence_parallel to a "
                          f"divisor of {world}")
    check_heads(model_config(cfg, tokenizer), n)
    lay = layout(world, rank, n)
    log.info("sequence parallel: %d ranks per row, %d data-parallel group(s) (this rank: SP %d, DP %d)",
             lay.size, lay.dp_size, lay.rank, lay.dp_rank)
    return lay


def check_heads(model_cfg, n: int) -> None:
    """Ulysses gives each rank heads / N query heads and splits (or replicates) the key/value heads."""
    text = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % n:
        best = max(d for d in range(1, n + 1) if heads % d == 0)
        raise ConfigError(f"distributed.sequence_parallel={n} must divide the model's {heads} attention heads "
                          f"(Ulysses gives each rank a slice of the heads). Fix: use a divisor of {heads}, e.g. {best}")
    if kv % n and n % kv:
        raise ConfigError(f"distributed.sequence_parallel={n} and the model's {kv} key/value heads: one must divide "
                          "the other (Ulysses splits or replicates the kv heads). Fix: choose N accordingly")


def before_prepare(lay: Layout, wrapped) -> None:
    """Ready the loss module for accelerate's Ulysses registration: the packed-aware attention core under the
    model's attention key, and the `config` accelerate reads from the module it prepares."""
    if not lay.enabled:
        return
    base = base_causal_lm(wrapped)
    install_packed_core(base.config._attn_implementation)
    wrapped.config = base.config  # accelerate checks the prepared module's config (attention, recurrent layers)


def after_prepare(lay: Layout, wrapped, attn_impl: str) -> str:
    """Attach the think-state exchange to the LM-head loss part; return the attention name for the batch's model
    inputs (under SP: no mask, position_ids only; the Ulysses core rebuilds the row's mask)."""
    if not lay.enabled:
        return attn_impl
    module = wrapped
    while not isinstance(module, LMHeadLoss) and hasattr(module, "module"):
        module = module.module
    state = think_state()
    if (state.size, state.rank) != (lay.size, lay.rank):
        raise RuntimeError(f"DeepSpeed's SP group (size {state.size}, rank {state.rank}) is not the planned one "
                           f"({lay.size}, {lay.rank})")
    if isinstance(module, LMHeadLoss) and not faults.sp_leak("think_state"):
        module.sequence_parallel = state
    return f"ulysses_sp({attn_impl})"


def parallelism_config(cfg: Config, world: int, device: str, compute_dtype: torch.dtype):
    """accelerate's ParallelismConfig for the run (None when SP is off): DeepSpeed ALST, variable row lengths,
    SP kept on in eval (eval batches are sharded like training ones)."""
    n = cfg.distributed.sequence_parallel
    if n == 1:
        return None
    impl = resolve_attention(cfg.model.attn_implementation, device, compute_dtype)
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=impl,
                                              sp_disable_in_eval=False)
    return ParallelismConfig(sp_backend="deepspeed", sp_size=n, dp_shard_size=world // n, sp_handler=handler)


# ----------------------------------------------------------------------------------------------------
# Sharding a collated micro-batch.
# ----------------------------------------------------------------------------------------------------

_PAD = {"labels": IGNORE_INDEX, "targets": IGNORE_INDEX, "target_weights": 0.0, "segment_ids": -1,
        "attention_mask": 0}


def pad_row(batch: dict, multiple: int) -> dict:
    """Extend every (B, T) tensor of a collated batch to a multiple of `multiple` columns, with packing's padding
    convention: never learned (labels/targets -100, weights 0), segment -1, position_ids 0, 1, ... so that the
    tail is an attention block of its own. Other values are kept."""
    t = batch["input_ids"].shape[-1]
    pad = (-t) % multiple
    if pad == 0:
        return dict(batch)
    b = batch["input_ids"].shape[0]
    out = dict(batch)
    for key, value in batch.items():
        if not (torch.is_tensor(value) and value.dim() == 2 and value.shape == (b, t)):
            continue
        if key == "position_ids":
            tail = torch.arange(pad, dtype=value.dtype, device=value.device).expand(b, pad)
        else:
            tail = torch.full((b, pad), _PAD.get(key, 0), dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, tail], dim=1)
    return out


def shard(batch: dict, lay: Layout | None) -> dict:
    """This rank's contiguous slice of a collated micro-batch (identity when SP is off).

    Every (B, T) tensor is cut at the same columns; the normalisers (`num_target_tokens`, `target_weight_sum`)
    are recomputed from the slice, so that summing them over all ranks counts each token once. `sp_shard`
    records (rank, size, local length)."""
    if lay is None or not lay.enabled:
        return batch
    full = pad_row(batch, lay.size)
    b, t = full["input_ids"].shape
    local = t // lay.size
    lo, hi = lay.rank * local, (lay.rank + 1) * local
    out = {}
    for key, value in full.items():
        is_row = torch.is_tensor(value) and value.dim() == 2 and value.shape == (b, t)
        out[key] = value[:, lo:hi].contiguous() if is_row else value
    if not faults.sp_leak("normaliser"):
        out["num_target_tokens"] = int((out["targets"] != IGNORE_INDEX).sum())
        out["target_weight_sum"] = float(out["target_weights"].sum(dtype=torch.float64))
    out["sp_shard"] = (lay.rank, lay.size, local)
    return out


# ----------------------------------------------------------------------------------------------------
# The think state across shards.
# ----------------------------------------------------------------------------------------------------

@dataclass
class ShardThink:
    """One shard's learned rows and what the think rule needs of them (all 1-D over those rows, in flat order)."""

    rows: torch.Tensor   # (M,) flat indices into the shard's B*T_local positions
    key: torch.Tensor    # (M,) sample id = row * n_seg + segment (segments are numbered over the whole row)
    pos: torch.Tensor    # (M,) float64 position in the whole row: shards are consecutive
    hit: torch.Tensor    # (M,) bool: the model's argmax is </think>
    z: torch.Tensor      # (M,) float64 </think> logit (the soft mode's)
    n_keys: int

    def stats(self) -> torch.Tensor:
        """(3 * n_keys,) float64: per sample, the first hit position (inf: none), max z (-inf: no row here) and
        sum exp(z - max z) over this shard's rows."""
        dev = self.z.device
        first = torch.full((self.n_keys,), math.inf, dtype=torch.float64, device=dev)
        first.scatter_reduce_(0, self.key[self.hit], self.pos[self.hit], reduce="amin")
        zmax = torch.full((self.n_keys,), -math.inf, dtype=torch.float64, device=dev)
        zmax.scatter_reduce_(0, self.key, self.z, reduce="amax")
        sumexp = torch.zeros(self.n_keys, dtype=torch.float64, device=dev)
        sumexp.index_add_(0, self.key, torch.exp(self.z - zmax[self.key]))
        return torch.cat([first, zmax, sumexp])


@torch.no_grad()
def shard_think_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     target_weights: torch.Tensor, segment_ids: torch.Tensor, think_end_id: int, chunk: int,
                     sp_rank: int, n_seg: int) -> ShardThink:
    """The argmax and `</think>` logit of this shard's learned rows (an extra logits pass over them, no backward).

    hidden (B, T_local, H), weight (V, H) (bias (V,)) in the dtype the loss runs in; targets, target_weights,
    segment_ids (B, T_local); n_seg: segments per row over the whole SP group (the max over its shards)."""
    b, t_local = targets.shape
    learned = (targets.reshape(-1) != IGNORE_INDEX) & (target_weights.reshape(-1) > 0)  # flce's learned rows
    rows = learned.nonzero().squeeze(1)
    n_seg = max(n_seg, 1)
    key = (torch.div(rows, t_local, rounding_mode="floor") * n_seg + segment_ids.reshape(-1)[rows].clamp_min(0))
    pos = (sp_rank * t_local + rows % t_local).double()
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    hit = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    z = torch.empty(rows.numel(), dtype=torch.float64, device=rows.device)
    w_think = weight[think_end_id].float()
    step = max(chunk, 1)
    for a in range(0, rows.numel(), step):
        x = flat_h.index_select(0, rows[a:a + step])
        logits = x @ weight.t()
        if bias is not None:
            logits = logits + bias
        hit[a:a + step] = torch.max(logits, dim=1).indices == think_end_id  # as the row kernel takes it
        z[a:a + step] = x.float() @ w_think  # as flce's _soft_multiplier: a float32 product, float64 after
    if bias is not None:
        z += float(bias[think_end_id])
    return ShardThink(rows=rows, key=key, pos=pos, hit=hit, z=z, n_keys=b * n_seg)


def think_multiplier(shard_rows: ShardThink, group_stats: torch.Tensor, sp_rank: int, mode: str) -> torch.Tensor:
    """(M,) float64 multiplier of one shard's learned rows from the (size, 3 * n_keys) stats of the SP group.

    argmax: 0 up to and including the sample's first hit on any shard, 1 after; soft: softmax of z over the
    sample's rows on all shards, cumulated in row order (earlier shards' mass + this shard's running sum);
    1 for a sample with no hit on any shard. The rule of distthink.ops.flce / tests/references/flce.py."""
    k, n = shard_rows.key, shard_rows.n_keys
    firsts, zmaxs, sums = group_stats[:, :n], group_stats[:, n:2 * n], group_stats[:, 2 * n:]
    g_first = firsts.min(0).values[k]
    has_hit = torch.isfinite(g_first)
    if mode == "argmax":
        return torch.where(has_hit & (shard_rows.pos <= g_first), 0.0, 1.0).double()
    if mode != "soft":
        raise ConfigError(f"dynamic={mode!r}. Fix: argmax or soft")
    g_max = zmaxs.max(0).values
    present = torch.isfinite(zmaxs)  # a shard holding none of a sample's rows adds nothing (and no NaN)
    mass = torch.where(present, sums * torch.exp(torch.where(present, zmaxs - g_max, 0.0)), 0.0)
    total, before = mass.sum(0), mass[:sp_rank].sum(0)
    p = torch.exp(shard_rows.z - g_max[k]) / total[k]
    # a sample's rows are consecutive here and in position order: its running sum restarts at its first row
    starts = torch.ones_like(k, dtype=torch.bool)
    starts[1:] = k[1:] != k[:-1]
    run = torch.cumsum(starts.long(), 0) - 1
    first_rows = starts.nonzero().squeeze(1)
    cs = torch.cumsum(p, 0)
    cdf = cs - (cs[first_rows] - p[first_rows])[run] + before[k] / total[k]
    return torch.where(has_hit, cdf.clamp(0.0, 1.0), torch.ones_like(cdf))


class ThinkState:
    """The SP group's agreement on the dynamic "after </think>" multipliers (see the module docstring).

    Attached to the LM-head loss part (`LMHeadLoss.sequence_parallel`); `dynamic_weights` is collective over the
    group: one extra logits pass over the shard's learned rows and two small collectives per micro-batch."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """(K,) -> (size, K), in SP-rank order."""
        if self.size == 1:
            return local[None]
        out = [torch.empty_like(local) for _ in range(self.size)]
        torch.distributed.all_gather(out, local.contiguous(), group=self.group)
        return torch.stack(out)

    def max_over_group(self, value: int, device) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(t)

    @torch.no_grad()
    def dynamic_weights(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, target_weights: torch.Tensor, segment_ids: torch.Tensor, mode: str,
                        think_end_id: int, chunk: int) -> torch.Tensor:
        """(B*T_local,) float32 static weight x dynamic multiplier of this shard's positions (a constant), for
        the shard's fused loss to run without its own dynamic rule."""
        n_seg = self.max_over_group(int(segment_ids.max()) + 1 if segment_ids.numel() else 0, hidden.device)
        rows = shard_think_rows(hidden, weight, bias, targets, target_weights, segment_ids, think_end_id, chunk,
                                self.rank, n_seg)
        mult = think_multiplier(rows, self.gather(rows.stats()), self.rank, mode)
        flat_w = target_weights.reshape(-1).float()
        out = torch.zeros_like(flat_w)
        out[rows.rows] = flat_w[rows.rows] * mult.float()
        return out


def think_state() -> ThinkState:
    """The think-state exchange over this rank's SP group (after accelerate created the groups)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu  # DeepSpeed: only SP runs import it

    group = mpu.get_sequence_parallel_group()
    return ThinkState(group, mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank())
