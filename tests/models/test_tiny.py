"""Tiny offline tokenizers/configs and the bundled sample data: deterministic, real special tokens,
learnable."""

from __future__ import annotations

import json

import pytest

from distthink.models.tiny import BPE_PATH, FAMILIES, build_tiny_bpe, tiny_qwen3_config, tiny_tokenizer

SPECIALS = {
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "deepseek_r1": ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>"],
    "plain": ["</s>"], "instruction": ["</s>"],
}


def test_bpe_asset_is_reproducible():
    shipped = json.loads(BPE_PATH.read_text(encoding="utf-8"))
    assert json.loads(build_tiny_bpe().to_str()) == shipped


def test_sample_data_is_reproducible():
    from distthink.data import sample_data

    train, eval_, forms = sample_data.generate()
    for path, recs in ((sample_data.TRAIN_PATH, train), (sample_data.EVAL_PATH, eval_),
                       (sample_data.FORMS_PATH, forms)):
        assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == recs
    assert len(train) == 300 and len(eval_) == 60
    multi = sum(1 for r in train if sum(m["role"] == "assistant" for m in r["messages"]) > 1)
    system = sum(1 for r in train if r["messages"][0]["role"] == "system")
    weighted = sum(1 for r in train for m in r["messages"] if "loss_weight" in m)
    assert multi > 20 and system > 50 and weighted > 10


@pytest.mark.parametrize("family", FAMILIES)
def test_family_special_tokens_are_single_tokens(family):
    tok = tiny_tokenizer(family)
    for sp in SPECIALS[family]:
        ids = tok(sp, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == sp
    assert tok.eos_token is not None and tok.pad_token is not None
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tiny_tokenizer(family) is not tok  # fresh object per call (callers may mutate)


def test_real_qwen3_token_roles_mirrored(qwen3_tokenizer):
    tiny = tiny_tokenizer("qwen3")
    assert tiny.eos_token == qwen3_tokenizer.eos_token == "<|im_end|>"
    assert tiny.pad_token == qwen3_tokenizer.pad_token == "<|endoftext|>"
    # <think> is an added, *non-special* token in both (skip_special_tokens keeps it)
    for tok in (tiny, qwen3_tokenizer):
        ids = tok("<think>x</think>", add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"


def test_tiny_qwen3_model_forward():
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer("qwen3")
    cfg = tiny_qwen3_config()
    assert cfg.vocab_size == len(tok) and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.tensor([tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.loss)


@pytest.mark.parametrize("src", ["tiny-qwen3", "tiny-llama"])
def test_tiny_model_built_for_a_real_tokenizer_uses_its_special_ids(src, qwen3_tokenizer):
    """A tiny architecture paired with the real Qwen3 tokenizer must stop/pad on Qwen3's ids, not the tiny
    tokenizer's (generation would otherwise never see its eos)."""
    from distthink.config import load_config
    from distthink.models.load import build_model_config

    cfg = load_config(None, [f"model.from_config={src}"])
    mcfg = build_model_config(cfg, qwen3_tokenizer)
    assert mcfg.vocab_size == len(qwen3_tokenizer)
    assert mcfg.eos_token_id == qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>") == qwen3_tokenizer.eos_token_id
    assert mcfg.pad_token_id == qwen3_tokenizer.pad_token_id != tiny_tokenizer("qwen3").pad_token_id
