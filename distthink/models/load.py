"""Model and tokenizer loading: pretrained or from config, LoRA or full fine-tuning, ZeRO-3 aware.

Call `load_tokenizer` then `load_model` *after* `distributed.setup()`: when the DeepSpeed plugin is
ZeRO-3, accelerate has registered the DeepSpeed config with transformers, so `from_pretrained` and
`from_config` construct each parameter already partitioned across ranks (`deepspeed.zero.Init`) and
no rank ever holds the full model. `is_partitioned(model)` lets tests check that it really happened.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import deepspeed as hf_ds

from distthink.config import Config, resolve_attention
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.tiled_mlp import tile_mlps
from distthink.models.tiny import tiny_llama_config, tiny_qwen3_config, tiny_tokenizer
from distthink.zero3 import full_numel, gathered, is_partitioned

log = get_logger(__name__)


def tokenizer_by_name(name: str, *, option: str = "model.tokenizer", trust_remote_code: bool = False,
                      local_files_only: bool = False, require_chat_template: bool = False):
    """A tokenizer by name: `tiny` / `tiny:FAMILY` = an offline tiny tokenizer (distthink.models.tiny), else a local
    directory or hub name (local_files_only: the local cache only, no network). A pad token is set to eos when the
    tokenizer has none. `option` names the setting in error messages."""
    if name == "tiny" or name.startswith("tiny:"):
        return tiny_tokenizer(name.split(":", 1)[1] if ":" in name else "qwen3")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option}='{name}' cannot be loaded ({err}). Fix: point it at a directory with "
                          "tokenizer.json / tokenizer_config.json, a reachable hub name, or `tiny`") from None
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise ConfigError(f"{option}='{name}' has no chat template. Fix: use a chat/instruct tokenizer, or add a "
                          "chat_template to its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(cfg: Config, local_files_only: bool = False):
    """The run's tokenizer: model.tokenizer, else model.name_or_path, else the offline tiny one."""
    return tokenizer_by_name(cfg.model.tokenizer or cfg.model.name_or_path or "tiny",
                             trust_remote_code=cfg.model.trust_remote_code, local_files_only=local_files_only)


def build_model_config(cfg: Config, tokenizer):
    """The transformers config of the model to build (from_config) with overrides applied."""
    src = cfg.model.from_config
    if src in ("tiny-qwen3", "tiny-llama"):
        build = tiny_qwen3_config if src == "tiny-qwen3" else tiny_llama_config
        mcfg = build(vocab_size=len(tokenizer))
        # The tiny configs carry the tiny tokenizer's special ids; a tiny model paired with a real tokenizer
        # (e.g. the vendored Qwen3 one) must stop and pad on *that* tokenizer's ids.
        mcfg.eos_token_id = tokenizer.eos_token_id
        mcfg.pad_token_id = tokenizer.pad_token_id
    elif src and Path(src).is_dir():
        mcfg = AutoConfig.from_pretrained(src)
    else:
        raise ConfigError(f"model.from_config='{src}' is neither `tiny-qwen3`, `tiny-llama` nor a directory with a "
                          "config.json. Fix: use one of those, or set model.name_or_path")
    for key, value in cfg.model.config_overrides.items():
        if not hasattr(mcfg, key):
            raise ConfigError(f"model.config_overrides.{key}: {type(mcfg).__name__} has no attribute '{key}'")
        setattr(mcfg, key, value)
    return mcfg


def load_model(cfg: Config, tokenizer, device: str, dtype: torch.dtype, compute_dtype: torch.dtype | None = None):
    """Build the causal LM (LoRA-wrapped when lora.enabled). Parameters are in `dtype`.

    compute_dtype: what attention computes in (default `dtype`; a 16-bit autocast run of fp32 weights passes its
    autocast dtype), which decides whether flash-attn can run (distthink.config.resolve_attention).
    Under ZeRO-3 the returned parameters are partitioned (shape (0,) locally until gathered).
    """
    attn = resolve_attention(cfg.model.attn_implementation, device, compute_dtype or dtype)
    torch.manual_seed(cfg.train.seed)  # identical random init on every rank and every launch
    if cfg.model.name_or_path:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype,
                                                         attn_implementation=attn,
                                                         trust_remote_code=cfg.model.trust_remote_code)
        except OSError as err:
            raise ConfigError(f"model.name_or_path='{cfg.model.name_or_path}' cannot be loaded ({err}). Fix: give "
                              "a local directory with config.json + safetensors, or a hub name with network "
                              "access") from None
    else:
        mcfg = build_model_config(cfg, tokenizer)
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype, attn_implementation=attn)
        if is_partitioned(model):
            _copy_unpartitioned_init(model, mcfg, dtype, attn, cfg.train.seed)
    vocab = model.get_input_embeddings().num_embeddings if not is_partitioned(model) else model.config.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}. Fix: use "
                          "the model's own tokenizer (model.tokenizer) or a model with a larger vocabulary")
    model.config.use_cache = False  # training never needs a KV cache (and it defeats packed attention)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlps(model, cfg.model.tiled_mlp)  # model.tiled_mlp: long rows, MLP activations one tile at a time
    if cfg.lora.enabled:
        model = wrap_lora(model, cfg)
    n_train = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    n_all = sum(full_numel(p) for p in model.parameters())
    log.info("model: %s, %s, attention=%s, %s params, %s trainable (%s)", type(model).__name__, dtype, attn,
             f"{n_all:,}", f"{n_train:,}", "LoRA" if cfg.lora.enabled else "full fine-tuning")
    return model


def _copy_unpartitioned_init(model, mcfg, dtype, attn: str, seed: int) -> None:
    """Give a ZeRO-3-partitioned random-init model the exact weights the same seed gives without ZeRO.

    `zero.Init` initialises parameters shard by shard, which consumes the RNG differently: the same
    seed would give another model under ZeRO-3 than under DDP or on one process, and runs could not be
    compared. Rank 0 builds the reference model unpartitioned (full size in memory: meant for
    from_config test/benchmark models; pretrained weights load exactly anyway) and each module's
    parameters are overwritten inside GatheredParameters(modifier_rank=0), which re-partitions them.
    """
    ref_modules = None
    if tdist.get_rank() == 0:
        ds_cfg = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref else None
        hf_ds.unset_hf_deepspeed_config()
        try:
            torch.manual_seed(seed)
            ref = AutoModelForCausalLM.from_config(mcfg, dtype=dtype, attn_implementation=attn)
        finally:
            if ds_cfg is not None:
                hf_ds.set_hf_deepspeed_config(ds_cfg)
        ref_modules = dict(ref.named_modules())
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        with gathered([p for _, p in params], modifier_rank=0):
            if ref_modules is not None:
                src = dict(ref_modules[name].named_parameters(recurse=False))
                with torch.no_grad():
                    for pname, p in params:
                        p.data.copy_(src[pname].data)


def wrap_lora(model, cfg: Config):
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.lora.target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} match no module of {type(model).__name__}. Fix: use "
                          f"names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lcfg)
    if cfg.model.gradient_checkpointing:
        # With frozen embeddings nothing before the first checkpointed block requires grad.
        model.enable_input_require_grads()
    return model


def side_module_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype for a trainable module added next to `model` (ThinkRec's projector, the molecule graph encoder):
    the dtype of the LM's trainable parameters (fp32 LoRA adapters on a 16-bit base, fp32 master weights under
    autocast, the 16-bit weights of a DeepSpeed full fine-tune), fp32 when nothing in the LM trains.

    DeepSpeed ZeRO-3 keeps all trainable parameters in flat partitions of one dtype (a bf16 encoder next to fp32
    LoRA fails at `prepare`), and without DeepSpeed a bf16 module under AdamW rounds small updates away; only
    DeepSpeed keeps fp32 master copies of 16-bit weights."""
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    return trainable.pop() if len(trainable) == 1 else torch.float32


def base_causal_lm(model):
    """The plain transformers model inside optional PEFT / DeepSpeed / wrapper layers."""
    m = model
    for _ in range(6):
        if hasattr(m, "module") and not hasattr(m, "lm_head"):
            m = m.module
        elif hasattr(m, "get_base_model"):
            m = m.get_base_model()
        elif hasattr(m, "model") and not hasattr(m, "lm_head"):
            m = m.model
        else:
            break
    return m
