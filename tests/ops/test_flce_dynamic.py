"""Dynamic ("after </think>") weights: the op against a plain-loop implementation of the rule.

Hidden states are crafted so that the argmax prediction is `</think>` exactly at chosen positions:
the `</think>` row of the lm_head is a long vector u; "hit" rows point along u, the others away from it.
"""

import pytest
import torch
from _flce_cases import HITS, LENGTHS, THINK, ZERO_WEIGHT_HIT, H, packed_case
from references.flce import naive_fused_linear_cross_entropy, reference_dynamic_multiplier, reference_sample_ids
from test_flce import close, grads_of

from distthink.ops import fused_linear_cross_entropy


def test_crafted_hits_are_where_we_put_them():
    hidden, weight, target, weights, pos, seg = packed_case()
    argmax = (hidden @ weight.t()).argmax(-1)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    want = sorted(starts[s] + off for s, off in HITS + ZERO_WEIGHT_HIT)
    assert (argmax == THINK).nonzero().squeeze(1).tolist() == want


def test_argmax_rule_reference_on_crafted_hits():
    """The reference itself, checked by hand on the crafted layout."""
    hidden, weight, target, weights, pos, seg = packed_case()
    ids = reference_sample_ids(hidden.shape[0], position_ids=pos)
    mult = reference_dynamic_multiplier(hidden @ weight.t(), target, weights, ids, "argmax", THINK)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    zero = {i for i in range(60) if mult[i] == 0}
    learned = lambda s, a, b: {starts[s] + o for o in range(a, b) if weights[starts[s] + o] > 0}
    assert zero == learned(0, 3, 7) | learned(3, 1, 2) | learned(2, 4, 19)


@pytest.mark.parametrize("mode", ["argmax", "soft"])
@pytest.mark.parametrize("chunk_size", [4, 7, 13, None])
@pytest.mark.parametrize("packing", ["position_ids", "segment_ids"])
@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_dynamic_matches_reference_on_crafted_hits(mode, chunk_size, packing, strategy):
    hidden, weight, target, weights, pos, seg = packed_case()
    meta = {"position_ids": pos} if packing == "position_ids" else {"segment_ids": seg}
    kw = dict(token_weights=weights, normalizer=11.0, dynamic=mode, think_end_id=THINK, **meta)
    loss, stats = fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size, return_stats=True,
                                             strategy=strategy, **kw)
    assert stats.strategy == strategy
    ref, mult = naive_fused_linear_cross_entropy(hidden, weight, target, **kw)
    close(loss, ref)
    for a, b in zip(grads_of(loss, (hidden, weight)), grads_of(ref, (hidden, weight))):
        close(a, b)
    assert stats.num_samples == 4 and int(stats.num_think_end_samples) == 3
    learned = weights > 0
    close(stats.weight_sum, (weights * mult * learned).sum())
    if mode == "argmax":
        assert int(stats.num_masked) == int(((mult == 0) & learned).sum()) == 4 + 1 + 14


@pytest.mark.parametrize("mode", ["argmax", "soft"])
@pytest.mark.parametrize("chunk_size", [5, 16])
@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_dynamic_with_random_hits_and_reduction_none(mode, chunk_size, strategy):
    """Hits wherever the model happens to predict </think>; soft weights genuinely fractional."""
    hidden, weight, target, weights, pos, seg = packed_case(seed=3, random_hits=True)
    hits = int(((hidden @ weight.t()).argmax(-1) == THINK).sum())
    assert 5 <= hits <= 40, hits
    kw = dict(token_weights=weights, dynamic=mode, think_end_id=THINK, position_ids=pos)
    _, mult = naive_fused_linear_cross_entropy(hidden, weight, target, **kw)
    if mode == "soft":
        assert ((mult > 0.01) & (mult < 0.99)).sum() >= 5
    for reduction in ("sum", "none"):
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size, reduction=reduction,
                                          strategy=strategy, **kw)
        ref, _ = naive_fused_linear_cross_entropy(hidden, weight, target, reduction=reduction, **kw)
        close(loss, ref)
        go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
        for a, b in zip(grads_of(loss, (hidden, weight), go), grads_of(ref, (hidden, weight), go)):
            close(a, b)


def test_sample_without_think_end_keeps_static_weights():
    hidden, weight, target, weights, pos, seg = packed_case()
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    s1 = slice(starts[1], starts[2])
    for mode in ("argmax", "soft"):
        kw = dict(token_weights=weights, dynamic=mode, think_end_id=THINK, segment_ids=seg, reduction="none")
        dyn = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4, **kw)
        static = fused_linear_cross_entropy(hidden, weight, target, token_weights=weights, reduction="none")
        close(dyn[s1], static[s1])
        assert (dyn[starts[0]:starts[1]] - static[starts[0]:starts[1]]).abs().max() > 0


def test_rows_of_a_batch_are_separate_samples():
    """(B, T, H) input whose segment_ids restart at 0 in every row: a row border is a sample border."""
    hidden, weight, target, weights, pos, seg = packed_case()
    # two rows of 30: row 0 = samples 0,1 (+7 of sample 2), row 1 = rest; segment ids restart per row
    seg_rows = seg.clone().view(2, 30)
    seg_rows[1] -= seg_rows[1, 0].item()
    kw = dict(dynamic="argmax", think_end_id=THINK, segment_ids=seg_rows, token_weights=weights.view(2, 30))
    h3, t3 = hidden.view(2, 30, H), target.view(2, 30)
    loss = fused_linear_cross_entropy(h3, weight, t3, chunk_size=6, **kw)
    ref, mult = naive_fused_linear_cross_entropy(h3, weight, t3, **kw)
    close(loss, ref)
    for a, b in zip(grads_of(loss, (hidden, weight)), grads_of(ref, (hidden, weight))):
        close(a, b)
    # the border split sample 2: its hit (offset 18 -> position 41) is in row 1 only
    assert mult[30] == 0 and mult[27] == 1


def test_recomputation_is_limited_to_pending_rows():
    """argmax mode: only rows of a hit-less sample that straddles a chunk border are recomputed."""
    hidden, weight, target, weights, pos, seg = packed_case()
    kw = dict(token_weights=weights, dynamic="argmax", think_end_id=THINK, position_ids=pos, return_stats=True)
    _, one_chunk = fused_linear_cross_entropy(hidden, weight, target, chunk_size=1000, strategy="rows", **kw)
    assert one_chunk.num_recomputed == 0
    _, small = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4, strategy="rows", **kw)
    learned_s1 = int((weights[14:23] > 0).sum())
    assert 0 < small.num_recomputed <= learned_s1
