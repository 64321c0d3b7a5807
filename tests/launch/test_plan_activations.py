"""The planner's activation count against what real transformers layers save for backward.

Reference: `torch.autograd.graph.saved_tensors_hooks` over a forward of a real Qwen3/Llama model built from
config (sdpa, the packed block-diagonal mask distthink passes on CPU), unique storages, parameters excluded.
One decoder layer = (3 layers) - (2 layers), so embeddings, rotary tables and the final norm cancel.
Dimensions are chosen so that H, q, kv and I all differ and each coefficient of the formula is exercised.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from distthink.launch.plan import ModelShape
from distthink.models.attention import block_causal_mask

T = 96
DIMS = dict(vocab_size=256, hidden_size=48, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
            head_dim=20)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _saved_bytes(cfg_cls, layers, dtype, lora_targets=None, dropout=0.0, autocast=False):
    cfg = cfg_cls(**DIMS, num_hidden_layers=layers, layer_types=["full_attention"] * layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if lora_targets is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                 target_modules=lora_targets))
        model.train()
        decoder = model.base_model.model.model
    else:
        decoder = model.model
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    seg = torch.cat([torch.zeros(T // 3), torch.ones(T - T // 3)]).long()[None]
    pos = torch.cat([torch.arange(T // 3), torch.arange(T - T // 3)])[None]
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st._cdata] = st.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=ids, position_ids=pos, attention_mask=block_causal_mask(seg), use_cache=False)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(n for k, n in saved.items() if k not in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg_cls", [Qwen3Config, LlamaConfig], ids=["qwen3", "llama"])
@pytest.mark.parametrize("lora", [None, (["q_proj", "v_proj"], 0.0), (["q_proj", "v_proj"], 0.1), (ALL, 0.0)],
                         ids=["full", "lora_qv", "lora_qv_dropout", "lora_all"])
def test_activation_bytes_per_layer_match_saved_tensors(cfg_cls, dtype, lora):
    targets, dropout = lora if lora else (None, 0.0)
    measured = (_saved_bytes(cfg_cls, 3, dtype, targets, dropout) - _saved_bytes(cfg_cls, 2, dtype, targets, dropout)) / T
    shape = ModelShape.from_hf_config(cfg_cls(**DIMS))
    b = 4 if dtype == torch.float32 else 2
    expected = shape.activation_bytes_per_token_layer(b, "sdpa", T, targets, dropout)
    if targets is not None:
        expected += shape.lora_bytes_per_token_layer(b, 4, targets, dropout)
    assert expected == pytest.approx(measured, rel=0.02), (expected, measured)


def test_flash_attention_path_saves_no_mask_and_no_repeated_kv():
    shape = ModelShape.from_hf_config(Qwen3Config(**DIMS))
    sdpa = shape.activation_bytes_per_token_layer(2, "sdpa", 4096)
    flash = shape.activation_bytes_per_token_layer(2, "flash", 4096)
    # sdpa: the (T, T) mask per layer dominates at long rows; flash saves k/v at kv width only.
    assert sdpa - flash == pytest.approx(2 * 4096 + 2 * (4 * shape.q_dim - 2 * shape.q_dim - 2 * shape.kv_dim))


@pytest.mark.parametrize("cfg_cls", [Qwen3Config, LlamaConfig], ids=["qwen3", "llama"])
def test_autocast_full_finetune_activations_and_weight_copies(cfg_cls):
    """fp32 weights under bf16 autocast (16-bit full fine-tuning without DeepSpeed): per-token activations
    plus the 16-bit copy of every matmul weight, which autocast saves for backward."""
    measured = (_saved_bytes(cfg_cls, 3, torch.float32, autocast=True)
                - _saved_bytes(cfg_cls, 2, torch.float32, autocast=True))
    shape = ModelShape.from_hf_config(cfg_cls(**DIMS))
    weight_copies = 2 * sum(a * c for a, c in shape.linear_shapes().values())
    expected = T * shape.activation_bytes_per_token_layer(2, "sdpa", T, None, autocast=True) + weight_copies
    assert expected == pytest.approx(measured, rel=0.02), (expected, measured)
