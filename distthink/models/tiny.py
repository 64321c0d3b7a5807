"""Tiny, fully offline tokenizers and model configs for tests, examples and the embedded default run.

`tiny_tokenizer(family)` returns a byte-level BPE tokenizer (trained deterministically on the bundled sample
text; the trainer stops at ~600 tokens because merges must occur twice, plus the family's special tokens) that carries the *real* special tokens of a model family plus a chat template
written for this project in that family's style (distthink/templates/<family>.jinja).

Families:
- "qwen3":       ChatML (<|im_start|>/<|im_end|>), <think>/</think> as non-special added tokens (as in
                 Qwen3), eos=<|im_end|>, pad=<|endoftext|>; template drops history reasoning.
- "llama3":      <|begin_of_text|> / header / <|eot_id|>; pad == eos == <|eot_id|> (the pad==eos case).
- "deepseek_r1": full-width special tokens; reasoning on the last turn only; generation prompt opens <think>.
- "plain":       no generation markers and no role tokens ("User: ...", "Assistant: ...</s>").
- "instruction": the plain "### Instruction: / ### Response:" format.

The base BPE (no special tokens) is stored in distthink/assets/tiny_bpe.json so loading takes milliseconds;
`build_tiny_bpe()` regenerates it bit-for-bit from `distthink.data.sample_data.tokenizer_training_text()`.
"""

from __future__ import annotations

import functools
import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from distthink.data.sample_data import tokenizer_training_text
from distthink.errors import ConfigError
from distthink.resources import ASSETS, CHAT_TEMPLATES

TEMPLATES = CHAT_TEMPLATES
BPE_PATH = ASSETS / "tiny_bpe.json"
BASE_VOCAB_SIZE = 1024

# family -> (special tokens, non-special added tokens, role of each special, template file)
_FAMILIES: dict[str, dict] = {
    "qwen3": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "added": ["<think>", "</think>"],
        "eos": "<|im_end|>", "pad": "<|endoftext|>", "bos": None,
    },
    "llama3": {
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"],
        "added": ["<think>", "</think>"],
        "eos": "<|eot_id|>", "pad": "<|eot_id|>", "bos": "<|begin_of_text|>",
    },
    "deepseek_r1": {
        "special": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜pad｜>"],
        "added": ["<think>", "</think>"],
        "eos": "<｜end▁of▁sentence｜>", "pad": "<｜pad｜>", "bos": "<｜begin▁of▁sentence｜>",
    },
    "plain": {
        "special": ["<s>", "</s>", "<pad>"],
        "added": [],
        "eos": "</s>", "pad": "<pad>", "bos": "<s>",
    },
    "instruction": {
        "special": ["<s>", "</s>", "<pad>"],
        "added": [],
        "eos": "</s>", "pad": "<pad>", "bos": "<s>",
    },
}
_ALIASES = {"deepseek-r1": "deepseek_r1", "r1": "deepseek_r1", "llama": "llama3", "qwen": "qwen3",
            "nomarkers": "plain", "alpaca": "instruction"}
FAMILIES = tuple(_FAMILIES)


def build_tiny_bpe(vocab_size: int = BASE_VOCAB_SIZE):
    """Train the base byte-level BPE (no special tokens) on the bundled sample text. Deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(tokenizer_training_text(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=None)
def _bpe_json() -> str:
    if BPE_PATH.exists():
        return BPE_PATH.read_text(encoding="utf-8")
    return build_tiny_bpe().to_str()


@functools.lru_cache(maxsize=None)
def _family_json(family: str) -> str:
    spec = _FAMILIES[family]
    tok = Tokenizer.from_str(_bpe_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    if spec["added"]:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    return tok.to_str()


def _canonical_family(family: str) -> str:
    fam = _ALIASES.get(family, family)
    if fam not in _FAMILIES:
        raise ConfigError(f"unknown tiny tokenizer family '{family}'. Fix: use one of {sorted(_FAMILIES)}")
    return fam


def chat_template(family: str) -> str:
    """The project's own chat template for a family (jinja source)."""
    return (TEMPLATES / f"{_canonical_family(family)}.jinja").read_text(encoding="utf-8")


def tiny_tokenizer(family: str = "qwen3"):
    """A fresh `PreTrainedTokenizerFast` for `family` (see module docstring). Offline, deterministic, fast:
    the BPE json is cached, each call returns a new wrapper object so callers may mutate it freely."""
    fam = _canonical_family(family)
    spec = _FAMILIES[fam]
    kwargs = {"eos_token": spec["eos"], "pad_token": spec["pad"]}
    if spec["bos"]:
        kwargs["bos_token"] = spec["bos"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_family_json(fam)),
                                  chat_template=chat_template(fam), clean_up_tokenization_spaces=False,
                                  **kwargs)
    tok.name_or_path = f"distthink-tiny-{fam}"
    return tok


def tiny_qwen3_config(vocab_size: int | None = None, *, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 16,
                      intermediate_size: int = 128, max_position_embeddings: int = 2048,
                      tie_word_embeddings: bool = True, **overrides):
    """A real `transformers.Qwen3Config`, tiny: build with `AutoModelForCausalLM.from_config(cfg)`.

    vocab_size defaults to len(tiny_tokenizer("qwen3")). Token ids of the qwen3 tiny tokenizer are used for
    eos/pad/bos so generation stops on <|im_end|>.
    """
    tok = tiny_tokenizer("qwen3")
    if vocab_size is None:
        vocab_size = len(tok)
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
               num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
               head_dim=head_dim, intermediate_size=intermediate_size,
               max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
               rope_theta=10000.0, rms_norm_eps=1e-6)
    cfg.update(overrides)
    return Qwen3Config(**cfg)


def tiny_llama_config(vocab_size: int | None = None, **overrides):
    """A tiny real `transformers.LlamaConfig` matching tiny_tokenizer("llama3")."""
    tok = tiny_tokenizer("llama3")
    cfg = dict(vocab_size=vocab_size or len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=2048,
               tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, rope_theta=10000.0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _write_bpe_asset() -> None:
    BPE_PATH.parent.mkdir(parents=True, exist_ok=True)
    text = build_tiny_bpe().to_str()
    # Normalise the JSON (stable key order) so regenerating gives a byte-identical file.
    BPE_PATH.write_text(json.dumps(json.loads(text), ensure_ascii=False, sort_keys=True) + "\n",
                        encoding="utf-8")


if __name__ == "__main__":
    _write_bpe_asset()
    print(f"wrote {BPE_PATH}")
