"""The planner's parameter and FLOP arithmetic against real models built from config (the reference)."""

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from distthink.errors import ConfigError
from distthink.launch.hardware import GPUS, GiB
from distthink.launch.plan import ModelShape, RunShape, estimate, plan_all, recommend

CONFIGS = {
    "qwen3": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2": Qwen2Config(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_param_count_matches_real_model(family):
    cfg = CONFIGS[family]
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())  # parameters() deduplicates tied weights
    assert ModelShape.from_hf_config(cfg).num_params == real


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]])
def test_lora_param_count_matches_peft(targets):
    from peft import LoraConfig, get_peft_model

    cfg = CONFIGS["qwen3"]
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_hf_config(cfg).lora_params(8, targets) == real


def test_llama3_8b_shape_is_the_published_size():
    cfg = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)
    assert ModelShape.from_hf_config(cfg).num_params == 8_030_261_248


def test_moe_and_incomplete_configs_are_refused_with_a_fix():
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        ModelShape.from_hf_config({"num_experts": 8, "hidden_size": 8})
    with pytest.raises(ConfigError, match="Fix"):
        ModelShape.from_hf_config({"hidden_size": 8})


def test_more_gpus_never_need_more_memory_and_zero3_beats_zero2_on_params():
    shape = ModelShape.from_hf_config(dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336))
    run = RunShape(tokens_per_micro_batch=4096, seq_len=4096, lora_rank=None)
    prev = None
    for nodes in (1, 2, 8):
        est = {e.candidate: e for e in plan_all(shape, run, nodes=nodes, gpus_per_node=8, gpu=GPUS["h100"])}
        assert est["zero3"].memory["params"] < est["zero2"].memory["params"]
        assert est["zero3_offload_optimizer"].memory["optimizer"] == 0
        if prev is not None:
            assert est["zero3"].total_bytes <= prev
        prev = est["zero3"].total_bytes


def test_nothing_fits_says_what_to_change():
    shape = ModelShape.from_hf_config(dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336))
    run = RunShape(tokens_per_micro_batch=65536, seq_len=4096, lora_rank=None, gradient_checkpointing=False,
                   fused_loss=False)
    best, msg = recommend(plan_all(shape, run, nodes=1, gpus_per_node=1, gpu=GPUS["a10g"]))
    assert best is None and "nothing fits" in msg and "Fix:" in msg


def test_flops_count_recompute_and_lora():
    shape = ModelShape.from_hf_config(CONFIGS["llama"])
    full = RunShape(tokens_per_micro_batch=128, seq_len=128, lora_rank=None, gradient_checkpointing=False)
    e = estimate(shape, full, nodes=1, gpus_per_node=1, gpu=GPUS["h100"], candidate="zero2", hfu=0.5)
    # Without recomputation model FLOPs equal executed FLOPs, so MFU equals the assumed utilisation.
    assert e.mfu == pytest.approx(0.5)
    ckpt = estimate(shape, RunShape(tokens_per_micro_batch=128, seq_len=128, lora_rank=None), nodes=1,
                    gpus_per_node=1, gpu=GPUS["h100"], candidate="zero2", hfu=0.5)
    assert ckpt.mfu == pytest.approx(0.5 * 6 / 8, rel=0.02)


LLAMA8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336)


def test_master_weights_follow_what_deepspeed_allocates():
    from distthink.launch.plan import memory_terms

    shape = ModelShape.from_hf_config(LLAMA8B)
    p = shape.num_params
    for b in (2, 4):
        run = RunShape(tokens_per_micro_batch=1024, seq_len=1024, lora_rank=None, dtype_bytes=b)
        z2 = memory_terms(shape, run, n=8, candidate="zero2")
        z3 = memory_terms(shape, run, n=8, candidate="zero3")
        assert z2["master_weights"] == p * 4 / 8  # stage_1_and_2 clones the partition, even in fp32
        assert z3["master_weights"] == (p * 4 / 8 if b == 2 else 0)  # stage3 shares an fp32 partition
        assert memory_terms(shape, run, n=8, candidate="zero3_offload_optimizer")["optimizer"] == 0
        assert memory_terms(shape, run, n=8, candidate="ddp")["master_weights"] == 0


def test_peak_is_two_phases_not_a_sum_and_gpu_terms_only_on_gpu():
    from distthink.launch.plan import BACKWARD, PERSISTENT, STEP, peak_allocated

    shape = ModelShape.from_hf_config(CONFIGS["llama"])
    for device in ("cpu", "cuda"):
        run = RunShape(tokens_per_micro_batch=256, seq_len=256, lora_rank=None, dtype_bytes=4, device=device)
        e = estimate(shape, run, nodes=1, gpus_per_node=1, gpu=GPUS["h100"], candidate="ddp")
        m = e.memory
        persistent = sum(m[k] for k in PERSISTENT)
        assert e.allocated_bytes == peak_allocated(m) == persistent + max(sum(m[k] for k in BACKWARD),
                                                                          sum(m[k] for k in STEP))
        assert e.allocated_bytes < persistent + sum(m[k] for k in BACKWARD + STEP)
        if device == "cpu":
            assert e.total_bytes == e.allocated_bytes
        else:
            assert e.total_bytes == pytest.approx(e.allocated_bytes * 1.1 + 0.75 * GiB)


def test_fused_loss_holds_the_lm_head_gradient_only_when_it_trains():
    shape = ModelShape.from_hf_config(LLAMA8B)
    full = RunShape(tokens_per_micro_batch=4096, seq_len=4096, lora_rank=None, fused_chunk_tokens=1024)
    lora = RunShape(tokens_per_micro_batch=4096, seq_len=4096, lora_rank=8, fused_chunk_tokens=1024)
    kw = dict(nodes=1, gpus_per_node=8, gpu=GPUS["h100"], candidate="zero3")
    vh = shape.vocab_size * shape.hidden_size
    m_full, m_lora = estimate(shape, full, **kw).memory, estimate(shape, lora, **kw).memory
    # Held into backward: the bf16 cast of the lm_head gradient (flce.py ctx.grads).
    assert m_full["loss_fused_kept"] - m_lora["loss_fused_kept"] == vh * 2
    # Forward peak: the fp32 gradient, plus the chunk workspace or (after the workspace is freed) its bf16 cast.
    workspace = 1024 * shape.vocab_size * (2 + 4) + 1024 * shape.hidden_size * 8
    assert m_full["loss_fused"] == 4096 * shape.hidden_size * 2 + vh * 4 + max(workspace, vh * 2)
    assert m_lora["loss_fused"] == 4096 * shape.hidden_size * 2 + workspace
    # The plain loss grows with the token budget; the fused chunk does not.
    big = RunShape(tokens_per_micro_batch=16384, seq_len=4096, lora_rank=8, fused_chunk_tokens=1024)
    e_small, e_big = estimate(shape, lora, **kw), estimate(shape, big, **kw)
    assert e_big.memory["loss_plain"] == 4 * e_small.memory["loss_plain"]
    assert e_big.memory["loss_fused"] - e_small.memory["loss_fused"] == (16384 - 4096) * shape.hidden_size * 2


def test_molora_multiplies_adapter_states_and_branch_outputs():
    from distthink.launch.plan import memory_terms
    from distthink.models.molora import MoLoRALinear  # noqa: F401  (the layer this models exists)

    shape = ModelShape.from_hf_config(LLAMA8B)
    lora = RunShape(tokens_per_micro_batch=4096, seq_len=4096, lora_rank=8, gradient_checkpointing=False)
    molora = RunShape(tokens_per_micro_batch=4096, seq_len=4096, lora_rank=8, molora_adapters=5,
                      gradient_checkpointing=False)
    a, m = memory_terms(shape, lora, n=8, candidate="zero3"), memory_terms(shape, molora, n=8, candidate="zero3")
    assert m["optimizer"] == pytest.approx(5 * a["optimizer"])
    # lora_A's output: r per target for LoRA, E r before and after the gate for MoLoRA (bf16 under DeepSpeed).
    per_target_extra = (2 * 5 - 1) * 8 * 2
    assert m["lora_activations"] - a["lora_activations"] == pytest.approx(
        4096 * shape.num_layers * per_target_extra * len(lora.lora_targets))


@pytest.mark.parametrize("lora, recompute, mult", [(False, False, 3), (True, False, 3), (False, True, 4),
                                                  (True, True, 4)])
def test_attention_flops_are_three_forwards_in_lora_as_in_full_fine_tuning(lora, recompute, mult):
    """QK^T and AV have no weights: their backward computes dQ, dK and dV whether the weights train or not, so
    attention costs forward + 2 x backward (+ 1 recomputed forward) in LoRA too. Only attention grows with the
    sequence, so the difference between two lengths is attention alone: 2 matmuls x 2 FLOPs per MAC x layers x
    q_dim x the mean causal context (seq/2), times the multiplier."""
    from distthink.launch.plan import model_flops_per_token

    shape = ModelShape.from_hf_config(CONFIGS["llama"])

    def fpt(seq):
        run = RunShape(tokens_per_micro_batch=seq, seq_len=seq, lora_rank=8 if lora else None,
                       gradient_checkpointing=recompute)
        return model_flops_per_token(shape, run)

    attention = fpt(4096) - fpt(1024)
    assert attention == pytest.approx(mult * 2 * 2 * shape.num_layers * shape.q_dim * (4096 - 1024) / 2, rel=1e-12)


@pytest.mark.parametrize("name, key, peak", [
    ("NVIDIA H100 80GB HBM3", "h100", 989e12), ("NVIDIA H100 PCIe", "h100-pcie", 756e12),
    ("NVIDIA H100 NVL", "h100-nvl", 835e12), ("NVIDIA H200", "h200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "a100", 312e12), ("NVIDIA A100-SXM4-40GB", "a100-40", 312e12),
    ("NVIDIA L40S", "l40s", 362e12), ("Tesla V100-SXM2-32GB", None, None)])
def test_gpus_are_matched_by_their_full_device_name(name, key, peak):
    from distthink.launch.hardware import gpu_for_device_name

    gpu = gpu_for_device_name(name)
    assert (gpu.name, gpu.bf16_flops) == (key, peak) if key else gpu is None
    # the substring match it replaces gave both PCIe/NVL cards the SXM peak
    if key in ("h100-pcie", "h100-nvl"):
        leaky = next(g for k, g in GPUS.items() if k in name.lower().replace(" ", ""))
        assert leaky.bf16_flops == 989e12 != gpu.bf16_flops
