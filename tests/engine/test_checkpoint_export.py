"""Export helpers: the LoRA merge of checkpoint.export=full equals peft's forward, and `distthink check`
refuses exports with empty tensors (what ZeRO-3 writes when shards are saved without gathering)."""

import copy

import torch
from _tolerance import TINY_DECODER_K, fp_tol

from distthink.engine.check import check_export
from distthink.engine.export import merge_lora_state_dict


def test_merged_lora_export_equals_the_adapter_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from distthink.config import load_config
    from distthink.models.load import load_model, load_tokenizer

    cfg = load_config(None, ["lora.enabled=true", "lora.dropout=0.0", "lora.r=4", "lora.alpha=12",
                             "lora.target_modules=[q_proj,v_proj,down_proj]"])
    model = load_model(cfg, load_tokenizer(cfg), "cpu", torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # trained-looking adapter (B starts at 0)
    ids = torch.randint(5, 500, (2, 13))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=ids).logits  # float64 reference
    merged = merge_lora_state_dict(model.state_dict(), model.peft_config["default"])
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = AutoModelForCausalLM.from_config(model.get_base_model().config)
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied head
    plain.tie_weights()
    with torch.no_grad():
        got = plain.eval()(input_ids=ids).logits
    # fp32 forward of the tiny decoder (the merged W + s B A rounds once more, like one more GEMM output)
    assert (got.double() - ref).abs().max() <= fp_tol(torch.float32, ref.abs().max(), k=TINY_DECODER_K)
    # and it differs from the base without the adapter, so the merge did something
    base_only = {k: v for k, v in merged.items()}
    assert not torch.allclose(base_only["model.layers.0.self_attn.q_proj.weight"],
                              model.state_dict()["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_check_refuses_empty_tensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(0), "b": torch.ones(3)}, str(tmp_path / "adapter_model.safetensors"))
    problems = check_export(tmp_path, generate=False)
    assert problems and "empty tensors" in problems[0]
