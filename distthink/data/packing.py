"""Padding-free packing: the collator and the distributed bin-packing batch sampler (the attention inputs a
packed row needs are distthink/models/attention.py's `model_inputs`).

Three pieces, each usable on its own:

1. ``PackingCollator`` turns a list of :class:`EncodedSample` into one micro-batch following the batch
   contract: one row of concatenated samples whose ``position_ids`` restart at 0 at each
   sample, with the next-token ``targets``/``target_weights`` shifted *within* each sample so that no
   target ever crosses into the neighbouring sample. ``packed=False`` gives the classic padded batch
   (one sample per row) with the same keys, for comparisons and benchmarks.

2. ``distthink.models.attention.model_inputs(batch, attn_implementation)`` turns such a batch into the
   keyword arguments of a HF decoder forward with attention kept inside each sample.

3. ``PackedBatchSampler`` plans, per epoch, which samples share a micro-batch so that each micro-batch
   holds at most ``token_budget`` tokens, every rank gets the same number of micro-batches (collectives
   never hang), every rank gets work, and every sample is used exactly once per epoch across ranks.
   The plan is a pure function of (lengths, budget, world size, seed, epoch): every rank computes the
   same global plan locally, without communication, and takes its share.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.errors import ConfigError, DataError
from distthink._deprecated import moved
from distthink.logging_utils import get_logger

log = get_logger(__name__)
# The attention inputs moved to distthink.models.attention; the old names work for one release.
__getattr__ = moved(__name__, {name: f"distthink.models.attention:{name}" for name in
                               ("block_causal_mask", "cu_seq_lens", "attn_implementation_of", "model_inputs")})


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def _check_samples(samples: Sequence[EncodedSample]) -> None:
    if not samples:
        raise DataError("cannot collate an empty micro-batch", reason="empty_batch",
                        fix="the batch sampler must give every micro-batch at least one sample")
    for i, s in enumerate(samples):
        if len(s) == 0:
            raise DataError(f"sample {i} of the micro-batch has no tokens", reason="empty_sample",
                            fix="drop empty samples upstream (encode_chat never produces them)")


def _shift_within(values: torch.Tensor, ends: torch.Tensor, fill: float | int) -> torch.Tensor:
    """values[t+1] at t, except at the last token of each sample (``ends - 1``) and at the very end.

    ``values``: (T,) flat row; ``ends``: (S,) exclusive end offset of each sample in the row.
    """
    out = torch.full_like(values, fill)
    out[:-1] = values[1:]
    out[ends - 1] = fill
    return out


def _finish_batch(input_ids, labels, weights, position_ids, segment_ids, ends_flat, num_samples,
                  meta) -> dict[str, Any]:
    """Shift labels/weights within samples on the flattened (B*T,) view and assemble the dict."""
    shape = input_ids.shape
    flat_labels = labels.reshape(-1)
    targets = _shift_within(flat_labels, ends_flat, IGNORE_INDEX)
    target_weights = _shift_within(weights.reshape(-1), ends_flat, 0.0)
    # A weight can only count where a target exists; padding and sample ends are already IGNORE.
    target_weights = torch.where(targets == IGNORE_INDEX, torch.zeros_like(target_weights), target_weights)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "targets": targets.view(shape),
        "target_weights": target_weights.view(shape),
        "segment_ids": segment_ids,
        "attention_mask": None,
        "num_samples": num_samples,
        "num_target_tokens": int((targets != IGNORE_INDEX).sum()),
        "target_weight_sum": float(target_weights.sum(dtype=torch.float64)),
        "sample_meta": meta,
    }


def collate_packed(samples: Sequence[EncodedSample], *, pad_token_id: int = 0,
                   pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Concatenate ``samples`` into one padding-free row (B=1).

    Returns the batch-contract dict; every tensor is (1, T) with T = sum of lengths rounded up to
    ``pad_to_multiple_of`` (the tail, if any, is padding: ``segment_ids`` -1, ``labels``/``targets``
    -100, weights 0, ``position_ids`` 0,1,.. so it forms its own harmless attention block).
    ``sample_meta`` is the list of each sample's ``meta`` in segment order.
    """
    _check_samples(samples)
    lengths = [len(s) for s in samples]
    n = sum(lengths)
    T = _round_up(n, pad_to_multiple_of)
    pad = T - n
    ids = [t for s in samples for t in s.input_ids] + [pad_token_id] * pad
    labs = [t for s in samples for t in s.labels] + [IGNORE_INDEX] * pad
    wts = [w for s in samples for w in s.loss_weights] + [0.0] * pad
    pos = [p for L in lengths for p in range(L)] + list(range(pad))
    seg = [i for i, L in enumerate(lengths) for _ in range(L)] + [-1] * pad
    ends = torch.tensor(np.cumsum(lengths), dtype=torch.long)
    return _finish_batch(
        torch.tensor([ids], dtype=torch.long), torch.tensor([labs], dtype=torch.long),
        torch.tensor([wts], dtype=torch.float32), torch.tensor([pos], dtype=torch.long),
        torch.tensor([seg], dtype=torch.long), ends, len(samples), [s.meta for s in samples],
    )


def collate_padded(samples: Sequence[EncodedSample], *, pad_token_id: int = 0,
                   pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Classic padded batch: one sample per row, right-padded to the longest (B=S rows, T columns).

    Same keys as :func:`collate_packed`; ``segment_ids`` of row b is b on its tokens, -1 on padding.
    ``attention_mask`` is the (B, T) 0/1 padding mask (informational: :func:`model_inputs` derives the
    attention from ``segment_ids`` in both modes).
    """
    _check_samples(samples)
    B = len(samples)
    T = _round_up(max(len(s) for s in samples), pad_to_multiple_of)
    ids, labs, wts, pos, seg, ends = [], [], [], [], [], []
    for b, s in enumerate(samples):
        L, pad = len(s), T - len(s)
        ids.append(list(s.input_ids) + [pad_token_id] * pad)
        labs.append(list(s.labels) + [IGNORE_INDEX] * pad)
        wts.append(list(s.loss_weights) + [0.0] * pad)
        pos.append(list(range(L)) + list(range(pad)))
        seg.append([b] * L + [-1] * pad)
        ends.append(b * T + L)
    batch = _finish_batch(
        torch.tensor(ids, dtype=torch.long), torch.tensor(labs, dtype=torch.long),
        torch.tensor(wts, dtype=torch.float32), torch.tensor(pos, dtype=torch.long),
        torch.tensor(seg, dtype=torch.long), torch.tensor(ends, dtype=torch.long), B,
        [s.meta for s in samples],
    )
    batch["attention_mask"] = (batch["segment_ids"] >= 0).long()
    return batch


@dataclass
class PackingCollator:
    """``collate_fn`` for a DataLoader whose dataset yields :class:`EncodedSample`.

    packed=True: one padding-free row per micro-batch (:func:`collate_packed`).
    packed=False: one padded row per sample (:func:`collate_padded`).
    """

    pad_token_id: int = 0
    packed: bool = True
    pad_to_multiple_of: int = 1

    def __call__(self, samples: Sequence[EncodedSample]) -> dict[str, Any]:
        fn = collate_packed if self.packed else collate_padded
        return fn(samples, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)


def batch_to(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (non-blocking); other values are kept as they are."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Bin planning
# --------------------------------------------------------------------------------------------------


def _check_lengths(lengths: np.ndarray, token_budget: int) -> None:
    if token_budget <= 0:
        raise ConfigError(f"token_budget must be positive, got {token_budget}")
    if lengths.size and lengths.min() <= 0:
        i = int(np.argmin(lengths))
        raise DataError(f"sample {i} has length {int(lengths[i])}", reason="empty_sample",
                        fix="every sample must have at least one token")
    over = np.flatnonzero(lengths > token_budget)
    if over.size:
        i = int(over[0])
        raise DataError(
            f"{over.size} sample(s) are longer than the token budget {token_budget} "
            f"(first: sample {i} with {int(lengths[i])} tokens); packing never drops or cuts samples",
            reason="longer_than_budget",
            fix="raise the token budget, or set max_length <= budget with a truncation policy "
                "(truncate_left / truncate_right / drop) when encoding",
        )


def _best_fit_decreasing(order: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes into the open bin with the least room that
    still fits it. Bins are bucketed by remaining room, so a lookup is one vectorised scan."""
    room_count = np.zeros(budget + 1, dtype=np.int64)  # how many bins have exactly this much room
    by_room: list[list[int]] = [[] for _ in range(budget + 1)]
    bins: list[list[int]] = []
    room_left: list[int] = []
    for idx in order:
        L = int(lengths[idx])
        hit = np.flatnonzero(room_count[L:])
        if hit.size:
            r = L + int(hit[0])
            b = by_room[r].pop()
            room_count[r] -= 1
        else:
            b, r = len(bins), budget
            bins.append([])
            room_left.append(budget)
        bins[b].append(int(idx))
        r -= L
        room_left[b] = r
        by_room[r].append(b)
        room_count[r] += 1
    return bins


def _balanced_fill(order: np.ndarray, lengths: np.ndarray, budget: int, k: int) -> list[list[int]] | None:
    """Longest-processing-time: each item (longest first) goes into the currently emptiest of k bins.
    Gives near-equal token counts per bin (ranks step in lockstep). None when an item no longer fits."""
    if k > len(order):
        return None
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for idx in order:
        L = int(lengths[idx])
        load, b = heapq.heappop(heap)
        if load + L > budget:
            return None
        bins[b].append(int(idx))
        heapq.heappush(heap, (load + L, b))
    return bins


def _split_until(bins: list[list[int]], k: int) -> list[list[int]]:
    """Reach exactly k bins by splitting the bins holding the most samples in two (no sample lost)."""
    bins = [list(b) for b in bins]
    while len(bins) < k:
        j = max(range(len(bins)), key=lambda i: len(bins[i]))
        if len(bins[j]) < 2:
            raise AssertionError("unreachable: caller checked there are at least k samples")
        b = bins[j]
        # Alternate members so both halves keep a mix of long and short samples.
        bins[j], new = b[0::2], b[1::2]
        bins.append(new)
    return bins


def plan_bins(lengths: Sequence[int], token_budget: int, *, num_bins_multiple_of: int = 1,
              seed: int = 0, epoch: int = 0, shuffle: bool = True) -> list[list[int]]:
    """Group sample indices into micro-batches of at most ``token_budget`` tokens.

    The number of bins is the smallest one found that is a multiple of ``num_bins_multiple_of``
    (world_size x grad-accumulation in the sampler). Strategy: best-fit decreasing gives a near-minimal
    feasible count; the count is rounded up to the multiple; then a longest-first fill into the
    emptiest bin balances tokens across bins (tried first at the lower bound max(ceil(total/budget),
    #samples > budget/2) rounded up). If the balanced fill does not fit, the best-fit bins are split
    (the bins with most samples, in two) until the count is reached. Every index appears exactly once.

    Deterministic in (lengths, token_budget, num_bins_multiple_of, seed, epoch, shuffle); with shuffle the
    order of bins is shuffled with the same seed so long and short micro-batches interleave (shuffle=False:
    no randomness at all, e.g. for evaluation).
    """
    lengths_np = np.asarray(lengths, dtype=np.int64)
    _check_lengths(lengths_np, token_budget)
    n = lengths_np.size
    m = max(1, int(num_bins_multiple_of))
    if n == 0:
        return []
    if n < m:
        raise ConfigError(
            f"{n} samples cannot fill {m} micro-batches (world size x grad accumulation): every rank needs "
            "work in every step and samples are never duplicated. Fix: use fewer ranks or a smaller grad "
            "accumulation, or more data",
        )
    rng = np.random.default_rng([seed, epoch])
    base = rng.permutation(n) if shuffle else np.arange(n)
    # Longest first; ties keep the shuffled order, so equal-length samples mix differently each epoch.
    order = base[np.argsort(-lengths_np[base], kind="stable")]

    total = int(lengths_np.sum())
    lower = max(math.ceil(total / token_budget), int((lengths_np > token_budget // 2).sum()), 1)
    k_low = _round_up(lower, m)
    bins = _balanced_fill(order, lengths_np, token_budget, k_low) if k_low <= n else None
    if bins is None:
        bfd = _best_fit_decreasing(order, lengths_np, token_budget)
        k = _round_up(len(bfd), m)
        if k > n:
            raise ConfigError(
                f"{n} samples need {len(bfd)} micro-batches of {token_budget} tokens, which cannot be made "
                f"a multiple of {m} (world size x grad accumulation) without duplicating samples; "
                "use fewer ranks / a smaller grad accumulation, or more data",
            )
        balanced = _balanced_fill(order, lengths_np, token_budget, k) if k > k_low else None
        bins = balanced if balanced is not None else _split_until(bfd, k)
    perm = rng.permutation(len(bins)) if shuffle else range(len(bins))
    return [sorted(bins[i]) for i in perm]


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], token_budget: int) -> float:
    """Real tokens / token slots, where each micro-batch offers ``token_budget`` slots."""
    if not bins:
        return 0.0
    real = sum(int(lengths[i]) for b in bins for i in b)
    return real / (len(bins) * token_budget)


# --------------------------------------------------------------------------------------------------
# Distributed batch sampler
# --------------------------------------------------------------------------------------------------


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class PackedBatchSampler:
    """Batch sampler (``DataLoader(dataset, batch_sampler=..., collate_fn=PackingCollator(...))``).

    Each epoch it plans micro-batches of at most ``token_budget`` tokens over the *whole* dataset with
    :func:`plan_bins`, then hands rank r the micro-batches r, r + W, r + 2W, ... (W = num_replicas).

    Guarantees (tested in tests/data/test_packing.py):
    - every sample is in exactly one micro-batch of exactly one rank per epoch (no loss, no duplicate);
    - every rank gets the same number of micro-batches, each non-empty; with
      ``grad_accumulation=GA`` that number is also a multiple of GA, so optimizer steps line up. The
      remainder is absorbed by planning more, lighter micro-batches, never by dropping or repeating;
    - deterministic given (lengths, token_budget, num_replicas, grad_accumulation, seed, epoch);
    - a sample longer than the budget raises :class:`DataError` (truncate upstream with max_length).

    Resume: the plan is a pure function of (lengths, budget, world, rank, GA, seed, epoch), so a trainer saves
    its count k of consumed micro-batches and continues with ``rank_batches(epoch)[k:]`` (what distthink's
    trainer does); a DataLoader prefetches, so the sampler's own iteration is no record of what was consumed.
    """

    def __init__(self, lengths: Sequence[int], token_budget: int, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, shuffle: bool = True, grad_accumulation: int = 1):
        world, me = _dist_world()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = me if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ConfigError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}")
        if grad_accumulation < 1:
            raise ConfigError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.token_budget = int(token_budget)
        self.seed, self.shuffle, self.grad_accumulation = int(seed), bool(shuffle), int(grad_accumulation)
        _check_lengths(self.lengths, self.token_budget)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    # -- planning ----------------------------------------------------------------------------------
    def global_plan(self, epoch: int | None = None) -> list[list[int]]:
        """All micro-batches of the epoch, for all ranks (rank r takes plan[r::num_replicas])."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            plan = plan_bins(self.lengths, self.token_budget,
                             num_bins_multiple_of=self.num_replicas * self.grad_accumulation,
                             seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            self._cache = (epoch, plan)
        return self._cache[1]

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        return self.global_plan(epoch)[self.rank::self.num_replicas]

    def num_batches(self, epoch: int | None = None) -> int:
        """Micro-batches this rank gets in ``epoch`` (the same on every rank)."""
        return len(self.global_plan(epoch)) // self.num_replicas

    def efficiency(self, epoch: int | None = None) -> float:
        return packing_efficiency(self.lengths, self.global_plan(epoch), self.token_budget)

    # -- epoch ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch that iteration plans (torch's DistributedSampler protocol)."""
        self.epoch = int(epoch)

    # -- iteration ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches()
