"""Training data for the recipe: encode the splits (once, into the shared cache), choose the micro-batch plan.

`load_split` asks the task how a split is encoded (`Task.split_encoding`) and returns the split's cache entry
(distthink/engine/shared_cache.py): a sequence of EncodedSamples read on demand, with a `lengths` array. The
samplers read the lengths alone; the collator fetches the rows of a micro-batch when it builds it.

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
import torch

from distthink.config import Config, resolve_cache_dir, resolve_num_proc
from distthink.data.chat import ChatPolicy
from distthink.data.dataset import ChatRecordEncoder, DatasetReport, check_label_audit, iter_records
from distthink.data.mixture import MixedSplit, is_mixture, parse_sources
from distthink.data.packing import PackedBatchSampler, PackingCollator, plan_bins
from distthink.data.parallel_encode import SplitEncoding
from distthink.data.types import IGNORE_INDEX
from distthink.engine import faults
from distthink.engine.shared_cache import open_split, ranks
from distthink.errors import ConfigError, DataError
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


def chat_split_encoding(cfg: Config, split: str, source: str | None = None) -> SplitEncoding:
    """The SFT encoding of a split (or of one `source` of a mixture): its records through encode_chat under
    data.policy (the `sft` task's)."""
    path = str(resolve_path(source or (cfg.data.train if split == "train" else cfg.data.eval), split))
    return SplitEncoding(sources=[path], records=lambda: iter_records(path), encoder=ChatRecordEncoder(
        chat_policy(cfg)), policy=chat_policy(cfg), limit=split_limit(cfg, split))


def open_encoding(cfg: Config, enc: SplitEncoding, tokenizer, label: str, *, progress: bool | None = None):
    """The cache entry of `enc` under this run's data.cache_* settings (built by the writing rank if missing),
    with its report logged and checked: the label audit, and on_error=raise against skips stored by an earlier
    on_error=skip encode. Collective under a process group."""
    data = open_split(enc, tokenizer, cache_dir=resolve_cache_dir(cfg), num_proc=resolve_num_proc(cfg),
                      scope=cfg.data.cache_scope, on_error=cfg.data.on_error, label=label,
                      progress=cfg.logging.progress if progress is None else progress,
                      stall_timeout_s=cfg.distributed.timeout_s)
    report = DatasetReport.from_dict(data.meta["report"])
    if ranks()[1] == 0:
        log.info("%s %s", label, report.summary())  # the summary starts with the source path
        if enc.describe is not None:
            log.info("%s: %s", label, enc.describe(data))
    if cfg.data.on_error == "raise" and report.num_skipped:
        reason, example = next(iter(report.examples.items()))
        raise DataError(f"{label}: the cached encoding skipped {report.num_skipped} record(s) (on_error=skip when it "
                        f"was built), e.g. [{reason}] {example}", source=str(data.path), reason=reason,
                        fix="correct those records, or set data.on_error=skip")
    check_label_audit(report.full_sequence_samples, report.samples, enc.policy.allow_full_sequence_loss,
                      report.source)
    return data


def load_split(cfg: Config, task, split: str, tokenizer):
    """The task's split as a cached, lazily read sequence of EncodedSamples (see the module docstring). A mixture
    (`data.train` as a list of sources) is a MixedSplit of one cached split per source."""
    spec = cfg.data.train if split == "train" else cfg.data.eval
    if split == "train" and is_mixture(spec):
        sources = parse_sources(spec)
        parts = [_load_one(cfg, task, split, tokenizer, f"data.train[{s.name}]", s.path, s.options) for s in sources]
        data = MixedSplit(parts, sources)
        if ranks()[1] == 0:
            log.info("data.train: a mixture of %s", ", ".join(f"{s.name} ({len(p)} samples, weight {s.weight:.3g})"
                                                            for s, p in zip(sources, parts)))
        return data
    return _load_one(cfg, task, split, tokenizer, f"data.{split}", None)


def _load_one(cfg: Config, task, split: str, tokenizer, label: str, source: str | None, options: dict | None = None):
    # per-source options only reach tasks that declare them (checked at start-up: engine/task.make_task)
    enc = task.split_encoding(split, tokenizer, source, **({"source_options": options} if options else {}))
    data = open_encoding(cfg, enc, tokenizer, label)
    if not len(data):
        raise ConfigError(f"{label}='{source or enc.sources[0]}': no usable sample after encoding. Fix: check the "
                          "file (see the skip report above)")
    return data


def split_report(dataset) -> DatasetReport | None:
    """What encoding did to a split's records (counts, skips by reason with the first message of each), as stored
    with its cache entry; a mixture's sources added up. None for a split that is not cached (in-memory lists)."""
    parts = getattr(dataset, "parts", [dataset])
    stored = [getattr(p, "meta", {}).get("report") for p in parts]
    if not stored or any(r is None for r in stored):
        return None
    report = DatasetReport.from_dict(stored[0])
    for other in stored[1:]:
        report.merge(DatasetReport.from_dict(other))
    return report


def skips_summary(report: DatasetReport | None, first: int = 3) -> dict:
    """{records, skipped, reasons: {reason: count}, examples: {reason: first message} of the `first` commonest}."""
    if report is None:
        return {}
    top = sorted(report.skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:first]
    return {"records": report.records, "skipped": report.num_skipped, "reasons": dict(report.skipped),
            "examples": {reason: report.examples.get(reason, "") for reason, _ in top}}


def lengths_of(dataset) -> np.ndarray:
    """Tokens per sample: the cache's lengths column, or len() of each in-memory sample."""
    lengths = getattr(dataset, "lengths", None)
    return np.asarray(lengths if lengths is not None else [len(s) for s in dataset], dtype=np.int64)


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


class MixtureSampler:
    """The plan of a mixture (distthink/data/mixture.py): each epoch, the samples drawn from the sources in their
    proportions (`MixedSplit.epoch_indices`, a pure function of (seed, epoch)) are planned like a split of their
    own: packed to the token budget (batch.mode=tokens) or `samples_per_micro` at a time in draw order (samples).
    Same contract as the other samplers: `rank_batches(epoch)` with a length that is a multiple of GA and equal on
    every rank."""

    def __init__(self, data: MixedSplit, cfg: Config, *, world: int, rank: int, grad_accumulation: int):
        self.data, self.world, self.rank, self.ga = data, world, rank, grad_accumulation
        self.seed, self.mode = cfg.train.seed, cfg.batch.mode
        self.budget, self.per_micro = cfg.batch.max_tokens, cfg.batch.samples_per_micro
        self._cache: tuple[int, list[list[int]]] | None = None

    def global_plan(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            ids = self.data.epoch_indices(self.seed, epoch)
            if self.mode == "samples":
                bins = SampleCountBatchSampler(len(ids), self.per_micro, num_replicas=self.world, rank=self.rank,
                                               seed=self.seed, shuffle=False,
                                               grad_accumulation=self.ga).global_plan(epoch)
            else:
                bins = plan_bins(self.data.lengths[ids], self.budget, num_bins_multiple_of=self.world * self.ga,
                                 seed=self.seed, epoch=epoch, shuffle=True)
            self._cache = (epoch, [[int(ids[p]) for p in b] for b in bins])
        return self._cache[1]

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.global_plan(epoch)[self.rank::self.world]


def source_counts(data, step_batches: list[list[int]], micro: list[dict]) -> list[float]:
    """Per source of a MixedSplit, this rank's [samples..., learned tokens..., target weight...] in the step's
    micro-batches (`micro[i]` collated from `step_batches[i]`; sample j of a micro-batch is its segment j)."""
    k = len(data.names)
    out = np.zeros((3, k))
    for b, m in zip(step_batches, micro):
        src = data.source_ids[np.asarray(b, dtype=np.int64)]
        seg = m["segment_ids"].reshape(-1)
        real = seg >= 0
        learned = torch.bincount(seg[real & (m["targets"].reshape(-1) != IGNORE_INDEX)], minlength=len(b))
        weight = torch.bincount(seg[real], weights=m["target_weights"].reshape(-1)[real].double(), minlength=len(b))
        np.add.at(out[0], src, 1)
        np.add.at(out[1], src, learned.numpy())
        np.add.at(out[2], src, weight.numpy())
    return out.reshape(-1).tolist()


def add_source_sums(acc: list[float], data, batch_ids: list[int], parts) -> None:
    """Add one micro-batch's per-sample loss and weight sums (kept by the LM-head loss `parts` during its forward)
    to `acc` = [loss sum per source..., weight sum per source...] of a MixedSplit (sample j = segment j = batch_ids[j];
    segments absent from a sequence-parallel shard add 0)."""
    k = len(data.names)
    src = data.source_ids[np.asarray(batch_ids, dtype=np.int64)]
    for part in parts:
        if part.segment_loss_sums is None:
            continue
        for offset, sums in ((0, part.segment_loss_sums), (k, part.segment_weight_sums)):
            values = sums.cpu().numpy()
            per_source = np.zeros(k)
            np.add.at(per_source, src[:len(values)], values)  # as source_counts does for the counts
            for i in range(k):
                acc[offset + i] += float(per_source[i])


def make_sampler(cfg: Config, samples, *, world: int, rank: int, grad_accumulation: int, shuffle: bool):
    """The micro-batch plan of a split, from its lengths alone (rows are never read here)."""
    if isinstance(samples, MixedSplit):
        return MixtureSampler(samples, cfg, world=world, rank=rank, grad_accumulation=grad_accumulation)
    if cfg.batch.mode == "samples":
        return SampleCountBatchSampler(len(samples), cfg.batch.samples_per_micro, num_replicas=world, rank=rank,
                                       seed=cfg.train.seed, shuffle=shuffle, grad_accumulation=grad_accumulation)

    return PackedBatchSampler(lengths_of(samples), cfg.batch.max_tokens, num_replicas=world, rank=rank,
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
