"""`distthink plan` with Ulysses sequence parallelism: the shard's activations, sdpa's whole-row mask, the
all-to-all volume, the allowed degrees, the advice, the 131,072-token Qwen3-8B question and the shipped config.

The activation figures are validated against measured CPU peaks at SP 1 and SP 2 in tests/launch/test_plan_validation.py
(cases small_2r_zero3_full_long and small_2r_zero3_full_long_sp2)."""

import json

import pytest

from distthink.cli import main
from distthink.launch.hardware import GPUS, GiB
from distthink.launch.plan import (
    ModelShape,
    RunShape,
    estimate,
    memory_terms,
    plan_sequence_parallel,
    sequence_parallel_advice,
    sequence_parallel_options,
)

QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
            "tie_word_embeddings": False}
SHAPE = ModelShape.from_hf_config(QWEN3_8B)
CANDIDATES = ["ddp", "zero2", "zero3", "zero3_offload_optimizer", "zero3_offload_params"]


def _run(tokens, sp=1, **kw):
    return RunShape(tokens_per_micro_batch=tokens, seq_len=tokens, lora_rank=None, sequence_parallel=sp, **kw)


def test_degrees_divide_gpus_and_heads():
    assert sequence_parallel_options(SHAPE, 8) == [1, 2, 4, 8]
    assert sequence_parallel_options(SHAPE, 16) == [1, 2, 4, 8, 16]  # 16 > 8 kv heads: replicated
    assert sequence_parallel_options(SHAPE, 12) == [1, 2, 4]  # 3, 6, 12 do not divide 32 heads


def test_flash_activations_are_those_of_the_shard():
    """With flash attention every per-token term is the shard's: SP N at T tokens == SP 1 at T / N tokens."""
    for ckpt in (True, False):
        sp8 = memory_terms(SHAPE, _run(65536, 8, gradient_checkpointing=ckpt), n=8, candidate="zero3")
        one = memory_terms(SHAPE, _run(8192, 1, gradient_checkpointing=ckpt), n=8, candidate="zero3")
        for key in ("activations", "loss_fused"):
            assert sp8[key] == pytest.approx(one[key]), key


def test_sdpa_mask_covers_the_whole_row_on_every_gpu():
    """sdpa's packed mask is T x T (in b, per layer kept) whatever N: the only per-row term SP does not divide."""
    b, t, layers = 2, 4096, SHAPE.num_layers
    kw = dict(attention="sdpa", gradient_checkpointing=False)
    sp2 = memory_terms(SHAPE, _run(t, 2, **kw), n=2, candidate="zero3")["activations"]
    flash2 = memory_terms(SHAPE, _run(t, 2, gradient_checkpointing=False), n=2, candidate="zero3")["activations"]
    # sdpa vs flash per token: 4 q (repeated kv) + an fp32 lse per head instead of 2 q + 2 kv + 4 heads, + the mask
    per_token = b * (4 * SHAPE.q_dim - 2 * SHAPE.q_dim - 2 * SHAPE.kv_dim)
    assert sp2 - flash2 == pytest.approx(layers * (t // 2 * per_token + b * t * t))


def test_all_to_all_volume_by_hand():
    """Per layer and pass: q, k, v and the output, (N-1)/N of the shard each, k/v at max(kv heads, N) heads."""
    run = _run(65536, 8, grad_accum=4)
    e = estimate(SHAPE, run, nodes=1, gpus_per_node=8, gpu=GPUS["h100"], candidate="zero3")
    per_pass = 7 / 8 * 8192 * 2 * (2 * 32 * 128 + 2 * 8 * 128)
    assert e.sp_comm_bytes == pytest.approx(4 * 3 * 36 * per_pass)  # GA 4 x (fwd, bwd, recompute) x 36 layers
    assert e.sp_comm_seconds == pytest.approx(e.sp_comm_bytes / GPUS["h100"].intra_node_bw)
    assert e.dp_size == 1 and e.sequence_parallel == 8
    across = estimate(SHAPE, _run(65536, 16, grad_accum=4), nodes=2, gpus_per_node=8, gpu=GPUS["h100"],
                      candidate="zero3")
    assert across.sp_comm_seconds == pytest.approx(across.sp_comm_bytes / GPUS["h100"].inter_node_bw)
    # the job's tokens/s counts each row once: DP groups x row tokens x GA per step
    assert e.tokens_per_s == pytest.approx(65536 * 4 / e.step_seconds)


@pytest.mark.parametrize("nodes, tokens_per_s", [(1, 16.5e3), (2, 32.9e3)])
def test_a_131072_token_qwen3_8b_row_on_h100_nodes(nodes, tokens_per_s):
    """The question of docs/training.md, 'Long sequences': full fine-tuning, bf16, flash-attn, checkpointing,
    GA 4. On one GPU the row fits only with everything offloaded (~80 GiB of 80); the planner advises SP 2."""
    kw = dict(nodes=nodes, gpus_per_node=8, gpu=GPUS["h100"])
    run = _run(131072, 1, grad_accum=4)
    rows = plan_sequence_parallel(SHAPE, run, CANDIDATES, **kw)
    assert [r["sequence_parallel"] for r in rows] == ([1, 2, 4, 8] if nodes == 1 else [1, 2, 4, 8, 16])
    at1 = {c: estimate(SHAPE, run, candidate=c, **kw) for c in CANDIDATES}
    assert [c for c, e in at1.items() if e.fits] == ["zero3_offload_params"]
    assert at1["zero3_offload_params"].total_bytes > 0.95 * 80 * GiB
    degree, line = sequence_parallel_advice(rows)
    assert degree == 2 and "zero2" in line and "only by offloading" in line
    chosen = next(r for r in rows if r["sequence_parallel"] == 2)["best"]
    assert chosen.tokens_per_s == pytest.approx(tokens_per_s, rel=0.01)
    assert rows[-1]["best"].total_bytes < 0.6 * 80 * GiB  # SP 8 (16): ample room


@pytest.fixture
def qwen3_8b_dir(tmp_path):
    d = tmp_path / "qwen3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN3_8B))
    return d


def test_shipped_long_context_config_fits_on_one_node_of_h100(capsys, qwen3_8b_dir, monkeypatch):
    """configs/qwen3_8b_long_sp.yaml (Qwen3-8B config read from a local copy: no network in tests)."""
    from _train_utils import ROOT

    monkeypatch.chdir(ROOT)
    rc = main(["plan", "--config", "configs/qwen3_8b_long_sp.yaml", f"model.name_or_path={qwen3_8b_dir}",
               "model.tokenizer=tiny", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100",
               "--dataset-tokens", "1e9", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["recommended"] is not None
    est = {c["candidate"]: c for c in plan["candidates"]}
    assert "ddp" not in est  # SP runs on DeepSpeed only
    z3 = est["zero3"]
    assert z3["fits"] and z3["sequence_parallel"] == 8 and z3["dp_size"] == 1
    assert z3["total_bytes"] < 0.4 * 80 * GiB
    assert plan["run"]["global_tokens_per_step"] == 65536 * 4
