"""Training data for the recipe: encode the splits, choose the micro-batch plan per rank.

Two batching modes (config `batch.mode`):
- `tokens` (default): distthink.data.packing.PackedBatchSampler packs samples up to a token budget.
- `samples`: exactly `batch.samples_per_micro` samples per micro-batch (SampleCountBatchSampler). The
  optimizer step k uses samples perm[k*S*GA*W : (k+1)*S*GA*W] of the epoch's permutation whatever the
  split of S (samples per micro-batch), GA and W (ranks), which is what the normalisation-invariance
  test needs: 1x4x1, 1x1x4 and 2x1x2 see the same four samples in every step.

Both samplers expose `rank_batches(epoch) -> list[list[int]]`, with a length that is a multiple of GA
and the same on every rank, so the recipe can index (epoch, step) directly for exact resume.

A resume on another data layout (data-parallel ranks or GA changed) continues at the same *global* sample
position instead (`continue_plan`): the checkpoint's ranks had consumed the first micro_index x DP micro-batches of
its epoch plan; the epoch's remaining samples are planned anew over the new ranks (RemainderOfEpoch), and later
epochs follow the new layout's plan. Over the whole run every sample is still seen once per epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distthink.config import Config
from distthink.data.chat import ChatPolicy
from distthink.data.dataset import build_sft_dataset
from distthink.data.packing import PackedBatchSampler, PackingCollator, plan_bins
from distthink.engine import faults
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.resources import ASSETS

log = get_logger(__name__)

BUNDLED = {"train": ASSETS / "sample_sft.jsonl", "eval": ASSETS / "sample_sft_eval.jsonl"}


def resolve_path(spec: str, split: str) -> Path:
    p = BUNDLED[split] if spec == "bundled" else Path(spec)
    if not p.exists():
        raise ConfigError(f"data.{split}='{spec}' does not exist. Fix: give a JSONL/Parquet file or `bundled`")
    return p


def split_limit(cfg: Config, split: str) -> int | None:
    """data.max_train_samples / data.max_eval_samples: the first N records of a split (None = all)."""
    n = cfg.data.max_train_samples if split == "train" else cfg.data.max_eval_samples
    return n or None


def chat_policy(cfg: Config):
    """distthink.data.chat.ChatPolicy from data.policy (+ data.max_length), refusing unknown keys."""
    kwargs = dict(cfg.data.policy)
    kwargs.setdefault("max_length", cfg.data.max_length)
    try:
        return ChatPolicy(**kwargs)
    except TypeError as err:
        raise ConfigError(f"data.policy: {err}. Fix: use the fields of distthink.data.chat.ChatPolicy") from None
    except ConfigError as err:
        raise ConfigError(f"data.policy: {err}") from None


def load_split(cfg: Config, split: str, tokenizer, policy) -> list:
    """Encode one split into EncodedSamples; malformed rows are skipped and counted (or raise)."""
    spec = cfg.data.train if split == "train" else cfg.data.eval
    path = resolve_path(spec, split)
    samples, report = build_sft_dataset(str(path), tokenizer, policy, on_error=cfg.data.on_error,
                                        limit=split_limit(cfg, split))
    log.info("%s split %s", split, report.summary())  # the summary starts with the source path
    if not samples:
        raise ConfigError(f"data.{split}='{spec}': no usable sample after encoding. Fix: check the file "
                          f"(see the skip report above)")
    return samples


class SampleCountBatchSampler:
    """Fixed number of samples per micro-batch; rank r takes micro-batches r, r+W, ... (see module doc).

    The tail of an epoch that cannot fill a whole optimizer step on every rank is dropped (logged).
    """

    def __init__(self, num_samples: int, samples_per_micro: int, *, num_replicas: int, rank: int, seed: int,
                 shuffle: bool, grad_accumulation: int):
        self.n, self.s = num_samples, samples_per_micro
        self.world, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.ga = grad_accumulation
        per_step = self.s * self.ga * self.world
        if self.n < per_step:
            raise ConfigError(f"{self.n} samples cannot fill one optimizer step of {per_step} "
                              f"(samples_per_micro x gradient_accumulation x ranks). Fix: use more data or "
                              "smaller batch settings")
        self.dropped = self.n % per_step
        if self.dropped:
            log.info("batch.mode=samples: the last %d samples of each epoch do not fill a step and are skipped",
                     self.dropped)

    def global_plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        usable = self.n - self.dropped
        return [order[i:i + self.s].tolist() for i in range(0, usable, self.s)]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.global_plan(epoch)[self.rank::self.world]


def make_sampler(cfg: Config, samples: list, *, world: int, rank: int, grad_accumulation: int, shuffle: bool):
    if cfg.batch.mode == "samples":
        return SampleCountBatchSampler(len(samples), cfg.batch.samples_per_micro, num_replicas=world, rank=rank,
                                       seed=cfg.train.seed, shuffle=shuffle, grad_accumulation=grad_accumulation)

    return PackedBatchSampler([len(s) for s in samples], cfg.batch.max_tokens, num_replicas=world, rank=rank,
                              seed=cfg.train.seed, shuffle=shuffle, grad_accumulation=grad_accumulation)


class RemainderOfEpoch:
    """The rest of one epoch, planned over a new layout after a resume; other epochs are the base sampler's."""

    def __init__(self, base, epoch: int, plan: list[list[int]], world: int, rank: int):
        self.base, self.epoch, self.plan, self.world, self.rank = base, epoch, plan, world, rank

    def global_plan(self, epoch: int) -> list[list[int]]:
        return self.plan if epoch == self.epoch else self.base.global_plan(epoch)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.plan[self.rank::self.world] if epoch == self.epoch else self.base.rank_batches(epoch)


def continue_plan(cfg: Config, samples: list, sampler, state: dict, *, world: int, rank: int,
                  grad_accumulation: int, shuffle: bool):
    """(sampler, micro_index) that continue a resumed run at the global sample position of `state` (its trainer
    state) when the data-parallel size or GA changed; unchanged otherwise (exact resume)."""
    old_world, old_ga = int(state.get("dp_size") or state["world_size"]), int(state["grad_accumulation"])
    epoch, position = int(state["epoch"]), int(state["micro_index"])
    if (old_world, old_ga) == (world, grad_accumulation) or faults.reshard_leak("per_rank_position"):
        return sampler, position
    old = make_sampler(cfg, samples, world=old_world, rank=0, grad_accumulation=old_ga, shuffle=shuffle)
    old_plan = old.global_plan(epoch)
    consumed = {i for b in old_plan[:position * old_world] for i in b}
    remaining = [i for b in old_plan[position * old_world:] for i in b]  # the samples the old run had left
    per_step = world * grad_accumulation
    if cfg.batch.mode == "samples":
        s = cfg.batch.samples_per_micro
        usable = len(remaining) - len(remaining) % (s * per_step)
        plan = [remaining[i:i + s] for i in range(0, usable, s)]
    else:
        lengths = [len(samples[i]) for i in remaining]
        plan = ([[remaining[j] for j in b] for b in plan_bins(lengths, cfg.batch.max_tokens,
                                                             num_bins_multiple_of=per_step, seed=cfg.train.seed,
                                                             epoch=epoch, shuffle=shuffle)]
                if len(remaining) >= per_step else [])
    skipped = len(remaining) - sum(len(b) for b in plan)
    unit = (f"{cfg.batch.samples_per_micro} samples" if cfg.batch.mode == "samples"
            else f"packed rows of <= {cfg.batch.max_tokens} tokens")
    log.info("resuming on %d data-parallel rank(s) x GA %d (the checkpoint had %d x GA %d): continuing epoch %d "
             "after its %d consumed samples; its %d remaining samples are re-planned over the new ranks%s; global "
             "batch: %d -> %d micro-batches (%s) per optimizer step", world, grad_accumulation, old_world, old_ga,
             epoch, len(consumed), len(remaining),
             f" ({skipped} that cannot fill a step on every rank are skipped)" if skipped else "",
             old_world * old_ga, per_step, unit)
    return RemainderOfEpoch(sampler, epoch, plan, world, rank), 0


def make_collator(cfg: Config, tokenizer):
    return PackingCollator(pad_token_id=tokenizer.pad_token_id or 0, packed=cfg.batch.packing)
