"""Sequence parallelism, in one process: the layout, the sharding of a collated micro-batch, the cross-shard think
rule against the plain-loop reference (tests/references/flce.py) and the start-up refusals.

The multi-process equality of loss and gradients (real Ulysses all-to-alls on gloo) is in
tests/engine/test_sequence_parallel_dist.py and tests/train/test_sequence_parallel_train.py."""

import json

import pytest
import torch
from _flce_cases import LENGTHS, THINK, packed_case
from _tolerance import fp_tol
from references.flce import naive_fused_linear_cross_entropy

from distthink.config import ConfigError, deepspeed_config, load_config
from distthink.data.packing import collate_packed
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.engine import sequence_parallel as sp
from distthink.models.tiny import tiny_qwen3_config, tiny_tokenizer
from distthink.tasks.sft import SFTTask


def test_layout_is_deepspeeds_consecutive_groups():
    assert [sp.layout(8, r, 4) for r in (0, 3, 4, 7)] == [
        sp.Layout(4, 0, 2, 0), sp.Layout(4, 3, 2, 0), sp.Layout(4, 0, 2, 1), sp.Layout(4, 3, 2, 1)]
    with pytest.raises(ConfigError, match="does not divide"):
        sp.layout(6, 0, 4)


def _samples():
    # three samples of 5, 7 and 6 tokens with a non-learned prompt each: 18 tokens, cut points fall mid-sample
    out = []
    for i, (n, prompt) in enumerate([(5, 2), (7, 3), (6, 1)]):
        ids = [10 * (i + 1) + k for k in range(n)]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        weights = [0.0] * prompt + [0.5 + 0.25 * k for k in range(n - prompt)]
        out.append(EncodedSample(ids, labels, weights))
    return out


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_shards_concatenate_to_the_padded_row_and_count_every_token_once(n):
    batch = collate_packed(_samples())
    t = batch["input_ids"].shape[1]
    shards = [sp.shard(batch, sp.layout(n, r, n)) for r in range(n)]
    padded = -(-t // n) * n
    for key in ("input_ids", "position_ids", "labels", "targets", "target_weights", "segment_ids"):
        whole = torch.cat([s[key] for s in shards], dim=1)
        assert whole.shape == (1, padded)
        assert torch.equal(whole[:, :t], batch[key]), key
    tail = slice(t, padded)
    whole = {k: torch.cat([s[k] for s in shards], dim=1)[0, tail] for k in ("targets", "target_weights",
                                                                            "segment_ids", "position_ids")}
    assert (whole["targets"] == IGNORE_INDEX).all() and (whole["target_weights"] == 0).all()
    assert (whole["segment_ids"] == -1).all() and whole["position_ids"].tolist() == list(range(padded - t))
    assert sum(s["num_target_tokens"] for s in shards) == batch["num_target_tokens"]
    assert sum(s["target_weight_sum"] for s in shards) == pytest.approx(batch["target_weight_sum"], abs=1e-12)
    assert all(s["sp_shard"] == (r, n, padded // n) for r, s in enumerate(shards))
    assert sp.shard(batch, sp.Layout()) is batch  # SP off: untouched


def _soft_tol(hidden, weight):
    """The soft multiplier is a cumulated softmax of the </think> logits z, which the reference reads off its full
    float32 logits GEMM and flce (like the shards) computes as a float32 dot product of length H: the two z differ
    by fp_tol(float32, |h|*|w|, k=H) at most, and a cumulated softmax moves by at most twice its inputs' largest
    shift. The softmax sums themselves are float64 (negligible). Argmax multipliers are exact (0 or 1)."""
    magnitude = float(hidden.norm(dim=1).max() * weight[THINK].norm())
    return 2 * fp_tol(torch.float32, magnitude, k=hidden.shape[1])


def _shard_multipliers(hidden, weight, target, weights, seg, n, mode, chunk=4):
    """Each shard's multiplier of its learned rows from the group's gathered stats, put back in row order."""
    t_local = hidden.shape[0] // n
    cut = lambda x, r: x[r * t_local:(r + 1) * t_local][None]  # noqa: E731
    n_seg = int(seg.max()) + 1
    rows = [sp.shard_think_rows(cut(hidden, r), weight, None, cut(target, r), cut(weights, r), cut(seg, r),
                                THINK, chunk, r, n_seg) for r in range(n)]
    stats = torch.stack([r.stats() for r in rows])
    out = torch.ones(hidden.shape[0], dtype=torch.float64)
    for r, part in enumerate(rows):
        out[r * t_local + part.rows] = sp.think_multiplier(part, stats, r, mode)
    return out


@pytest.mark.parametrize("mode", ["argmax", "soft"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_cross_shard_think_rule_equals_the_whole_row_reference(mode, n):
    """Crafted hits (tests/ops/test_flce_dynamic.py): samples of 14, 9, 20, 17 tokens; first hits at row positions 6
    (sample 0), 41 (sample 2), 44 (sample 3); sample 1 never predicts </think>. With n=5 (cuts at 12, 24, ...)
    sample 0's </think> is on shard 0 and its answer continues on shard 1; with n=2 (cut at 30) sample 2's rows on
    shard 0 are masked by a hit on shard 1; with n=4 sample 3's hit (44) is on shard 2, its answer on shard 3."""
    hidden, weight, target, weights, pos, seg = packed_case()
    hidden, weight = hidden.detach(), weight.detach()
    _, ref = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=weights, dynamic=mode,
                                              think_end_id=THINK, position_ids=pos)
    learned = (target != IGNORE_INDEX) & (weights > 0)
    got = _shard_multipliers(hidden, weight, target, weights, seg, n, mode)
    tol = _soft_tol(hidden, weight)
    assert torch.allclose(got[learned].float(), ref[learned], atol=tol, rtol=0), (got[learned], ref[learned])
    if mode == "argmax" and n == 2:
        starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
        sample2_on_shard0 = [i for i in range(starts[2], 30) if learned[i]]
        assert sample2_on_shard0 and all(got[i] == 0 for i in sample2_on_shard0)  # masked by the hit at 41


@pytest.mark.parametrize("mode", ["argmax", "soft"])
def test_without_the_exchange_each_shard_is_wrong(mode):
    """The leaky variant: each shard applies the rule to its own rows (the plain fused op on the shard)."""
    hidden, weight, target, weights, pos, seg = packed_case()
    hidden, weight = hidden.detach(), weight.detach()
    _, ref = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=weights, dynamic=mode,
                                              think_end_id=THINK, position_ids=pos)
    leaky = torch.ones(60)
    for r in range(2):
        s = slice(30 * r, 30 * (r + 1))
        _, leaky[s] = naive_fused_linear_cross_entropy(hidden[s], weight, target[s], token_weights=weights[s],
                                                       dynamic=mode, think_end_id=THINK, position_ids=pos[s])
    learned = (target != IGNORE_INDEX) & (weights > 0)
    assert (leaky[learned] - ref[learned]).abs().max() > 0.1


def test_think_rule_with_no_learned_row_on_a_shard():
    """A shard with nothing to learn still takes part in the exchange and adds nothing to any sample."""
    hidden, weight, target, weights, pos, seg = packed_case()
    hidden, weight = hidden.detach(), weight.detach()
    target, weights = target.clone(), weights.clone()
    target[30:] = IGNORE_INDEX
    weights[30:] = 0
    _, ref = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=weights, dynamic="soft",
                                              think_end_id=THINK, position_ids=pos)
    got = _shard_multipliers(hidden, weight, target, weights, seg, 2, "soft")
    learned = (target != IGNORE_INDEX) & (weights > 0)
    assert torch.allclose(got[learned].float(), ref[learned], atol=_soft_tol(hidden, weight), rtol=0)


def _cfg(tmp_path, ds_extra=None, **over):
    ds = {"zero_optimization": {"stage": 3, **(ds_extra or {})}, "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    items = {"distributed.deepspeed": str(path), "distributed.sequence_parallel": 2, **over}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


@pytest.mark.parametrize("over, needle", [
    ({"distributed.deepspeed": "null"}, "runs on DeepSpeed"),
    ({"batch.packing": "false"}, "batch.packing=true"),
    ({"loss.impl": "hf"}, "loss.impl=fused"),
    ({"model.attn_implementation": "eager"}, "eager"),
    ({"distributed.sequence_parallel": 0}, ">= 1"),
])
def test_config_refusals_name_the_key_and_the_fix(tmp_path, over, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        _cfg(tmp_path, **over)
    assert "Fix:" in str(err.value)


def test_zero_stage_refusals(tmp_path):
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        _cfg(tmp_path, ds_extra={"stage": 1})
    with pytest.raises(ConfigError, match="reduce_scatter=false"):
        _cfg(tmp_path, ds_extra={"reduce_scatter": False})
    _cfg(tmp_path, ds_extra={"stage": 2})  # accepted


def test_deepspeed_batch_fields_count_data_parallel_ranks(tmp_path):
    cfg = _cfg(tmp_path, **{"batch.gradient_accumulation": 3})
    ds = deepspeed_config(cfg, 8)
    assert ds["train_batch_size"] == 4 * 3 and ds["sequence_parallel_size"] == 2
    plain = load_config(None, [f"distributed.deepspeed={tmp_path / 'ds.json'}", "batch.gradient_accumulation=3"])
    assert deepspeed_config(plain, 8)["train_batch_size"] == 24 and "sequence_parallel_size" not in \
        deepspeed_config(plain, 8)


def test_start_up_checks_of_the_launch_task_and_heads(tmp_path):
    cfg = _cfg(tmp_path)
    heads4_kv2 = tiny_qwen3_config(vocab_size=64)
    assert sp.run_layout(cfg, SFTTask(cfg), tiny_tokenizer("qwen3"), 4, 3) == sp.Layout(2, 1, 2, 1)
    sp.check_heads(heads4_kv2, 2)
    sp.check_heads(heads4_kv2, 4)  # kv heads 2 replicated to 4
    with pytest.raises(ConfigError, match="attention heads"):
        sp.check_heads(heads4_kv2, 3)
    with pytest.raises(ConfigError, match="key/value heads"):
        sp.check_heads(tiny_qwen3_config(vocab_size=64, num_attention_heads=6, num_key_value_heads=4), 6)

    class WholeRowTask:
        supports_sequence_parallel = False

    with pytest.raises(ConfigError, match="does not support distributed.sequence_parallel"):
        sp.run_layout(cfg, WholeRowTask(), None, 2, 0)
    with pytest.raises(ConfigError, match="does not divide the 3 launched"):
        sp.run_layout(cfg, SFTTask(cfg), None, 3, 0)
    off = load_config(None, [])
    assert sp.run_layout(off, WholeRowTask(), None, 4, 1) == sp.Layout(1, 0, 4, 1)


def test_gradient_divisor_per_zero_stage(tmp_path):
    """DeepSpeed divides by DP under ZeRO-1/2 and by the world size under ZeRO-3 (see gradient_divisor)."""
    lay = sp.layout(8, 5, 2)
    assert sp.gradient_divisor(_cfg(tmp_path), lay) == 8
    assert sp.gradient_divisor(_cfg(tmp_path, ds_extra={"stage": 2}), lay) == 4
    assert sp.gradient_divisor(load_config(None, []), sp.Layout(1, 0, 8, 5)) == 8
