"""`distthink check` says what it checked, one line per check, then OK (exit 0), or the problems (exit 1).

Exports are written here the way plain transformers/peft write them (a tiny Qwen3 from config, the tiny
tokenizer); the counts the command prints are compared with the files read back independently."""

from __future__ import annotations

import json
import re

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distthink.cli import main
from distthink.models.tiny import tiny_qwen3_config, tiny_tokenizer

EXPORT_CHECKS = ["files", "tensors", "finite", "tokenizer", "chat template", "forward", "generation"]


def full_export(path, **config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(**config))
    model.save_pretrained(str(path))
    tiny_tokenizer("qwen3").save_pretrained(str(path))
    return path


def adapter_export(path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_qwen3_config())
    base.save_pretrained(str(path / "base_model"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".0." in name:  # layer 0 trained, layer 1 still at its zero init
                p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    tiny_tokenizer("qwen3").save_pretrained(str(path))
    return path


def run_check(capsys, *args):
    code = main(["check", *map(str, args)])
    out = capsys.readouterr().out
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^  (\S.*?)  +(\S.*)$", out, flags=re.M)}
    return code, out, lines


def test_full_export_lists_every_check_then_ok(tmp_path, capsys):
    path = full_export(tmp_path / "export")
    code, out, lines = run_check(capsys, path)
    assert code == 0 and out.rstrip().endswith(f"{path}: OK")
    assert [k for k in lines] == ["files", "tensors", "load", *EXPORT_CHECKS[2:]]
    tensors = load_file(str(path / "model.safetensors"))
    assert lines["tensors"].startswith(f"{len(tensors)} tensors in model.safetensors")
    assert f"{sum(t.numel() for t in tensors.values()):,} values" in lines["tensors"]
    assert "none empty" in lines["tensors"] and "F32" in lines["tensors"]
    assert "none missing" in lines["load"] and "Qwen3ForCausalLM" in lines["load"]
    assert f"{len(tiny_tokenizer('qwen3'))} tokens" in lines["tokenizer"]
    assert lines["chat template"].startswith("present")
    assert re.search(r"logits \[1, \d+, \d+\], finite, in \d+\.\d\d s", lines["forward"])
    assert re.match(r"4 greedy token\(s\) in \d+\.\d\d s", lines["generation"])


def test_adapter_export_checks_the_adapter_tensors(tmp_path, capsys):
    path = adapter_export(tmp_path / "export")
    save_file({"proj.weight": torch.ones(4, 2)}, str(path / "projector.safetensors"))  # a task's file beside it
    code, out, lines = run_check(capsys, path, "--no-generate")
    assert code == 0, out
    adapter = load_file(str(path / "adapter_model.safetensors"))
    n_b = sum(1 for k in adapter if "lora_B" in k)
    nonzero = sum(1 for k, t in adapter.items() if "lora_B" in k and t.any())
    assert 0 < nonzero < n_b
    assert lines["adapter"].startswith("LoRA r=4 alpha=8 on q_proj, v_proj: ")
    assert f"{len(adapter)} tensors, all non-empty" in lines["adapter"]
    assert f"{nonzero} of {n_b} lora_B non-zero" in lines["adapter"]
    assert "base_model/" in lines["base"] and lines["generation"] == "skipped (--no-generate)"
    assert lines["tensors"].startswith(f"{len(adapter) + 1} tensors in 2 files")


def test_a_tensor_missing_from_the_export_is_a_problem(tmp_path, capsys):
    """transformers would initialise the missing weight at random and load without error."""
    path = full_export(tmp_path / "export")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    code, out, _ = run_check(capsys, path, "--no-generate")
    assert code == 1
    assert "1 parameters not in the files (left randomly initialised), e.g. model.layers.1.mlp.down_proj.weight" in out


def test_an_adapter_tensor_the_model_does_not_use_is_a_problem(tmp_path, capsys):
    path = adapter_export(tmp_path / "export")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key.replace("q_proj", "k_proj")] = tensors[key].clone()  # k_proj has no adapter in this config
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    code, out, _ = run_check(capsys, path, "--no-generate")
    assert code == 1 and "not used" in out and "k_proj" in out


def test_nan_in_checkpoint_weights_is_a_problem(tmp_path, capsys):
    step = tmp_path / "checkpoints" / "step-00000003"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000003\n")
    for name in ("COMPLETE", "config.yaml", "random_states_0.pkl"):
        (step / name).write_text("")
    (step / "trainer_state.json").write_text(json.dumps({"step": 3, "epoch": 0, "micro_index": 6, "scheduler": {},
                                                          "run_totals": {"learned_tokens": 10}}))
    weights = {"w": torch.ones(4, 2), "b": torch.zeros(4)}
    save_file(weights, str(step / "model.safetensors"))
    code, out, lines = run_check(capsys, tmp_path)
    assert code == 0, out
    assert lines["checkpoint"].startswith("step-00000003: COMPLETE marker, trainer_state.json (step 3, epoch 0)")
    assert lines["weights"].startswith("2 tensors in model.safetensors") and "all finite" in lines["weights"]
    weights["w"][1, 1] = float("nan")
    save_file(weights, str(step / "model.safetensors"))
    code, out, _ = run_check(capsys, tmp_path)
    assert code == 1 and "1 tensor(s) hold NaN/Inf values, e.g. w" in out


def test_tokenizer_larger_than_the_embedding_is_a_problem(tmp_path, capsys):
    vocab = 64
    path = full_export(tmp_path / "export", vocab_size=vocab, pad_token_id=None, eos_token_id=None)
    code, out, _ = run_check(capsys, path)
    assert code == 1 and f"only {vocab} rows" in out
