"""MoLoRA export/reload: adapters load with plain peft and reproduce the MoLoRA output for one-hot gates;
load_molora rebuilds the exact model and gate; experts initialise from a stage-1 peft adapter (in memory or
from its folder). Tiny Qwen3 from config, fp32, CPU."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol
from safetensors.numpy import save_file
from safetensors.torch import load_file

from distthink.errors import CheckpointError, ConfigError
from distthink.models.molora import apply_molora, hard_gate, molora_gates, molora_layers
from distthink.models.molora_export import adapter_names, export_molora
from distthink.tasks.thinkrec.gate import EntropyGate, GateConfig, load_molora

K = 3
TARGETS = ["q_proj", "v_proj", "up_proj"]
IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 23], [7, 7, 120, 1, 2, 90, 33, 4]])


def _base(seed=0):
    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(seed)
    cfg = tiny_qwen3_config(vocab_size=128, pad_token_id=0, eos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()


def _molora(seed=1):
    model = apply_molora(_base(), K, r=4, alpha=8, dropout=0.05, target_modules=TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in molora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model.eval()


def _groups_dir(path, k=K, d=5):
    g = np.random.default_rng(0)
    path.mkdir()
    save_file({"centroids": g.normal(size=(k, d)).astype(np.float32),
               "centroids_raw": g.normal(size=(k, d)).astype(np.float32),
               "scaler_mean": g.normal(size=d).astype(np.float32),
               "scaler_scale": (g.random(d) + 0.5).astype(np.float32)}, str(path / "groups.safetensors"))
    (path / "groups.json").write_text(json.dumps({"n_groups": k}))
    pd.DataFrame({"user_id": range(6), "raw_user_id": [f"u{i}" for i in range(6)], "group": [0, 1, 2, 0, 1, 2],
                  "fitted": [True] * 6}).to_parquet(path / "user_groups.parquet", index=False)
    return path


def _logits(model, gates):
    with molora_gates(model, gates), torch.no_grad():
        return model(input_ids=IDS).logits


def _logits_tol(ref):
    """fp32 logits of the tiny model against a float64 reference: TINY_DECODER_K chained reductions."""
    return fp_tol(torch.float32, ref.abs().max(), k=TINY_DECODER_K)


def test_exported_adapters_load_with_plain_peft_and_match_one_hot_gates(tmp_path):
    from peft import PeftModel

    model = _molora()
    out = export_molora(model, tmp_path / "exp", groups_dir=_groups_dir(tmp_path / "groups"))
    names = adapter_names(K)
    assert names == ["expert_0", "expert_1", "expert_2", "global"]
    for e, name in enumerate(names):
        d = out / name
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        peft_model = PeftModel.from_pretrained(_base(), str(d)).eval().double()  # the float64 reference
        with torch.no_grad():
            ref = peft_model(input_ids=IDS).logits
        got = _logits(model, hard_gate(torch.full((2,), e), K))
        assert (got.double() - ref).abs().max().item() < _logits_tol(ref), name
        # layer level: the peft layer and the MoLoRA layer on the same input, one-hot gate
        path = "model.layers.1.self_attn.v_proj"
        x = torch.randn(2, 8, 64)
        pl = peft_model.get_base_model().get_submodule(path)
        ml = molora_layers(model)[path]
        # fp32 W x + s B (A x) vs float64: length-64 dot products, scaled by the sum of the terms' magnitudes
        absolute = copy.deepcopy(pl)
        for p in absolute.parameters():
            p.data.abs_()
        with torch.no_grad():
            tol = fp_tol(torch.float32, absolute(x.double().abs()).max(), k=x.shape[-1])
        with molora_gates(model, hard_gate(torch.full((2,), e), K)), torch.no_grad():
            assert (ml(x).double() - pl(x.double())).abs().max().item() < tol
    # the adapters differ from each other by orders of magnitude more (the test above cannot pass by accident)
    expert0, expert1 = _logits(model, hard_gate(torch.zeros(2), K)), _logits(model, hard_gate(torch.ones(2), K))
    assert (expert0 - expert1).abs().max() > 1000 * _logits_tol(ref)


def test_molora_json_and_reload(tmp_path):
    model = _molora()
    groups = _groups_dir(tmp_path / "groups")
    gate = EntropyGate.from_groups(groups, GateConfig(tau=0.2, expert_margin=0.5, entropy_frac=0.9))
    out = export_molora(model, tmp_path / "exp", gate=gate, groups_dir=groups)
    meta = json.loads((out / "molora.json").read_text())
    assert meta["num_experts"] == K and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert meta["target_modules"] == sorted(TARGETS)
    assert meta["group_to_adapter"] == {"0": "expert_0", "1": "expert_1", "2": "expert_2"}
    assert meta["global_adapter"] == "global" and meta["adapters"][-1] == "global"
    assert meta["gate"]["tau"] == 0.2 and meta["gate"]["expert_margin"] == 0.5 and meta["gate"]["entropy_frac"] == 0.9
    assert meta["gate"]["space"] == "raw"  # the default: the raw group means of groups.safetensors
    assert np.allclose(meta["gate"]["centroids"], load_file(str(groups / "groups.safetensors"))["centroids_raw"])
    assert meta["user_groups"] == "user_groups.parquet" and (out / "user_groups.parquet").is_file()

    reloaded, gate2 = load_molora(_base(), out)
    raw = torch.randn(2, 5)
    assert torch.equal(gate2(raw).weights, gate(raw).weights)
    gates = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert torch.equal(_logits(reloaded.eval(), gates), _logits(model, gates))
    for n, layer in molora_layers(reloaded).items():
        assert torch.equal(layer.lora_A, molora_layers(model)[n].lora_A)
        assert torch.equal(layer.lora_B, molora_layers(model)[n].lora_B)
    with pytest.raises(CheckpointError, match="molora.json"):
        load_molora(_base(), tmp_path / "groups")
    with pytest.raises(ConfigError, match="centroids"):
        export_molora(model, tmp_path / "bad", gate=EntropyGate(torch.randn(5, 4)))


def test_experts_start_from_a_stage1_peft_adapter(tmp_path):
    """Every expert and the global adapter start as the stage-1 adapter, so any gate (rows summing to 1)
    reproduces the stage-1 model exactly: in memory (peft-wrapped model) and from the adapter folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    stage1 = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in stage1.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    stage1.eval()
    with torch.no_grad():
        ref = copy.deepcopy(stage1).double()(input_ids=IDS).logits   # float64 reference
    tol = _logits_tol(ref)
    stage1.save_pretrained(str(tmp_path / "stage1"))
    gates = torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.0, 1.0, 0.0, 0.0]])

    from_folder = apply_molora(_base(), K, init_from_peft_adapter=tmp_path / "stage1").eval()
    layer = next(iter(molora_layers(from_folder).values()))
    assert layer.r == 4 and layer.scaling == 4.0
    assert sorted({n.rsplit(".", 1)[-1] for n in molora_layers(from_folder)}) == ["q_proj", "v_proj"]
    assert (_logits(from_folder, gates).double() - ref).abs().max().item() < tol

    in_memory = apply_molora(stage1, K).eval()         # the peft wrapper is removed, its layers swapped
    assert type(in_memory).__name__ == "Qwen3ForCausalLM"
    assert (_logits(in_memory, gates).double() - ref).abs().max().item() < tol
    for layer in molora_layers(in_memory).values():
        a0, b0 = layer.adapter_weights(0)
        for e in range(1, K + 1):
            a, b = layer.adapter_weights(e)
            assert torch.equal(a, a0) and torch.equal(b, b0)
    # the no-op gate (all zeros) is the base model: the adapter contributed far more than the tolerance above
    with torch.no_grad():
        base_logits = _base()(input_ids=IDS).logits
    assert (ref - base_logits).abs().max() > 1000 * tol

    with pytest.raises(ConfigError, match="r=8 differs"):
        apply_molora(_base(), K, r=8, init_from_peft_adapter=tmp_path / "stage1")
    with pytest.raises(ConfigError, match="alpha"):
        apply_molora(_base(), K, alpha=4, init_from_peft_adapter=tmp_path / "stage1")
    with pytest.raises(ConfigError, match="not targeted"):
        apply_molora(_base(), K, target_modules=["q_proj"], init_from_peft_adapter=tmp_path / "stage1")
    with pytest.raises(ConfigError, match="neither"):
        apply_molora(_base(), K, init_from_peft_adapter=tmp_path / "missing")
