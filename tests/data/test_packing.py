"""Packing invariants: the collator's shifted targets/weights against hand-computed rows, and the
sampler's distributed guarantees (no loss/duplicate, equal counts, determinism, budget, resume)."""

import numpy as np
import pytest
import torch

from distthink.data.packing import IGNORE_INDEX as X
from distthink.data.packing import (
    PackedBatchSampler,
    PackingCollator,
    collate_packed,
    collate_padded,
    packing_efficiency,
    plan_bins,
)
from distthink.data.types import EncodedSample
from distthink.errors import ConfigError, DataError
from distthink.models.attention import block_causal_mask, cu_seq_lens, model_inputs


def _sample(ids, labels, weights, **meta):
    return EncodedSample(list(ids), list(labels), [float(w) for w in weights], dict(meta))


# Two samples written by hand: prompt tokens are not learned, answers are (weight 1 / 0.5).
A = _sample([11, 12, 13, 14], [X, X, 13, 14], [0, 0, 1, 1], name="a")
B = _sample([21, 22, 23], [X, 22, 23], [0, 0.5, 0.5], name="b")


def test_packed_row_hand_computed():
    b = collate_packed([A, B], pad_token_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]
    assert b["labels"].tolist() == [[X, X, 13, 14, X, 22, 23, X]]
    # targets[t] = labels[t+1] within the sample; the last token of each sample has no target, so
    # position 3 (last of A) must NOT see B's first label, and position 6 (last of B) not the padding.
    assert b["targets"].tolist() == [[X, 13, 14, X, 22, 23, X, X]]
    assert b["target_weights"].tolist() == [[0, 1, 1, 0, 0.5, 0.5, 0, 0]]
    assert b["num_samples"] == 2
    assert b["num_target_tokens"] == 4
    assert b["target_weight_sum"] == pytest.approx(3.0)
    assert b["attention_mask"] is None
    assert [m["name"] for m in b["sample_meta"]] == ["a", "b"]
    assert b["target_weights"].dtype == torch.float32 and b["targets"].dtype == torch.long


def test_target_never_crosses_when_next_sample_starts_learned():
    # If the next sample's first label is learned (e.g. unmask=True or a raw-text sample), a naive
    # global shift would make the previous sample's last token predict it.
    c = _sample([31, 32], [31, 32], [1, 1])
    b = collate_packed([A, c])
    assert b["targets"].tolist() == [[X, 13, 14, X, 32, X]]
    assert b["target_weights"].tolist() == [[0, 1, 1, 0, 1, 0]]


def test_padded_mode_hand_computed():
    b = collate_padded([A, B], pad_token_id=0)
    assert b["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 23, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 1, -1]]
    assert b["targets"].tolist() == [[X, 13, 14, X], [22, 23, X, X]]
    assert b["target_weights"].tolist() == [[0, 1, 1, 0], [0.5, 0.5, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # Same learned tokens and weight either way: packing must not change the training signal.
    p = collate_packed([A, B])
    assert b["num_target_tokens"] == p["num_target_tokens"]
    assert b["target_weight_sum"] == p["target_weight_sum"]


def test_collator_object_and_empty_batch():
    assert PackingCollator(packed=False)([A])["input_ids"].shape == (1, 4)
    assert PackingCollator(pad_to_multiple_of=16)([A, B])["input_ids"].shape == (1, 16)
    with pytest.raises(DataError):
        PackingCollator()([])


def test_block_causal_mask_and_cu_seq_lens():
    b = collate_packed([A, B], pad_to_multiple_of=8)
    mask = block_causal_mask(b["segment_ids"])[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for lo, hi in [(0, 4), (4, 7), (7, 8)]:
        for q in range(lo, hi):
            expected[q, lo:q + 1] = True
    assert torch.equal(mask, expected)
    cu, mx = cu_seq_lens(b["position_ids"])
    assert cu.tolist() == [0, 4, 7, 8] and mx == 4 and cu.dtype == torch.int32
    # padded mode, flattened over rows: each row and each padding tail is its own sequence
    cu2, _ = cu_seq_lens(collate_padded([A, B])["position_ids"])
    assert cu2.tolist() == [0, 4, 7, 8]


def test_model_inputs_per_implementation():
    b = collate_packed([A, B])
    fa = model_inputs(b, "flash_attention_2")
    assert fa["attention_mask"] is None and fa["cu_seq_lens_q"].tolist() == [0, 4, 7]
    assert fa["max_length_q"] == 4 and fa["use_cache"] is False
    sd = model_inputs(b, "sdpa")
    assert sd["attention_mask"].dtype == torch.bool and sd["attention_mask"].shape == (1, 1, 7, 7)
    ea = model_inputs(b, "eager", dtype=torch.bfloat16)
    assert ea["attention_mask"].dtype == torch.bfloat16
    assert torch.equal(ea["attention_mask"] == 0, sd["attention_mask"])
    assert "input_ids" not in model_inputs(b, "sdpa", with_input_ids=False)


# ---------------------------------------------------------------------------------------------- sampler

def _lengths(n, seed=0, budget=256):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(3.5, 0.9, size=n).astype(int), 1, budget).tolist()


@pytest.mark.parametrize("world,ga", [(1, 1), (3, 1), (4, 2), (8, 4)])
def test_sampler_distributed_invariants(world, ga):
    budget = 256
    lengths = _lengths(403, budget=budget)
    per_rank = []
    for rank in range(world):
        s = PackedBatchSampler(lengths, budget, num_replicas=world, rank=rank, seed=7, grad_accumulation=ga)
        s.set_epoch(3)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == s.num_batches(3)
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks got different numbers of micro-batches: {counts}"
    assert counts.pop() % ga == 0
    seen = [i for batches in per_rank for mb in batches for i in mb]
    assert sorted(seen) == list(range(len(lengths))), "a sample was lost or duplicated across ranks"
    for batches in per_rank:
        for mb in batches:
            assert mb, "a micro-batch is empty"
            assert sum(lengths[i] for i in mb) <= budget


def test_sampler_deterministic_and_epoch_dependent():
    lengths = _lengths(300)
    a = PackedBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=1)
    b = PackedBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=1)
    a.set_epoch(5), b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b), "epochs should reshuffle"
    c = PackedBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=2)
    c.set_epoch(5)
    assert list(a) != list(c)


def test_sampler_resume_by_position_is_exact():
    """A fresh sampler with the same arguments plans the same epoch: resuming after k consumed micro-batches is
    rank_batches(epoch)[k:] (what the trainer does); another seed is another plan."""
    lengths = _lengths(300)
    full = PackedBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=3)
    full.set_epoch(2)
    reference = list(full)
    assert len(full) == len(reference) == full.num_batches(2)
    resumed = PackedBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=3)
    assert reference[:5] + resumed.rank_batches(2)[5:] == reference
    assert PackedBatchSampler(lengths, 256, num_replicas=2, rank=1, seed=4).rank_batches(2) != reference


def test_sampler_rejects_oversize_and_too_few_samples():
    with pytest.raises(DataError, match="longer than the token budget") as e:
        PackedBatchSampler([10, 300, 20], 256)
    assert "max_length" in str(e.value)
    with pytest.raises(ConfigError, match="cannot fill"):
        PackedBatchSampler([10, 20, 30], 256, num_replicas=4, rank=0).num_batches()


def test_remainder_absorbed_without_loss():
    # 5 samples that fit in one bin, 4 ranks: the plan must make 4 non-empty micro-batches, not drop one.
    lengths = [10, 10, 10, 10, 10]
    plan = plan_bins(lengths, 256, num_bins_multiple_of=4)
    assert len(plan) == 4 and all(plan)
    assert sorted(i for b in plan for i in b) == list(range(5))


def test_plan_hand_computed_bins():
    # budget 10: {6,4} {5,5} {3,3,3} -> 3 bins, each as full as possible; total 29/30.
    lengths = [6, 4, 5, 5, 3, 3, 3]
    plan = plan_bins(lengths, 10, shuffle=False)
    assert sorted(sorted(lengths[i] for i in b) for b in plan) == [[3, 3, 3], [4, 6], [5, 5]]
    assert packing_efficiency(lengths, plan, 10) == pytest.approx(29 / 30)


def test_packing_efficiency_realistic():
    # SFT-like lengths (median ~650 tokens, long tail), 4096 budget: target >= 0.97.
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 0.8, size=3000).astype(int), 16, 4096).tolist()
    plan = plan_bins(lengths, 4096, num_bins_multiple_of=8)
    assert packing_efficiency(lengths, plan, 4096) >= 0.97


def test_encode_benchmark_smoke(capsys):
    """benchmarks/encode.py runs and ends with the JSON line of its figures (tiny run)."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "encode.py"
    argv = sys.argv
    sys.argv = [str(script), "--samples", "40", "--world-size", "2"]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert e.value.code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["budget"] == 4096 and result["num_samples"] == 40
    for key in ("samples_per_s", "packing_efficiency", "padded_vs_packed_tokens_ratio"):
        assert result[key] > 0
    assert result["padded_vs_packed_tokens_ratio"] >= 1.0


def test_shuffle_false_has_no_randomness():
    lengths = _lengths(200)
    assert plan_bins(lengths, 256, shuffle=False, seed=1) == plan_bins(lengths, 256, shuffle=False, seed=2)


@pytest.mark.parametrize("seed", range(6))
def test_split_path_keeps_invariants(monkeypatch, seed):
    """Force the fallback (best-fit bins split until the count is a multiple of W x GA) and check the
    same invariants; random sizes, budgets and multiples."""
    import distthink.data.packing as packing

    monkeypatch.setattr(packing, "_balanced_fill", lambda *a, **k: None)
    rng = np.random.default_rng(seed)
    budget = int(rng.integers(64, 512))
    lengths = rng.integers(1, budget + 1, size=int(rng.integers(40, 300))).tolist()
    m = int(rng.choice([1, 2, 3, 8, 16]))
    plan = plan_bins(lengths, budget, num_bins_multiple_of=m, seed=seed)
    assert len(plan) % m == 0 and all(plan)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in plan) <= budget
