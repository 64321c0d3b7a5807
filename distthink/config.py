"""Typed, validated training configuration: one place for every key and its default.

A run's config is the embedded default (distthink/configs/default.yaml) deep-merged with an optional
YAML file and `key=value` overrides with dotted keys (`train.lr=1e-4 lora.r=16`). Every key is a field
of a dataclass below; the field's `help` metadata is the documentation that docs/configuration.md is
generated from (`python -m distthink.config --markdown`).

Validation happens once, at start-up: an unknown key, a value of the wrong type or an impossible
combination raises ConfigError naming the key and the fix, before any model is built.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from distthink.data.mixture import parse_sources
from distthink.data.types import ON_ERROR_CHOICES, ON_ERROR_DEFAULT
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.optional import has_flash_attn

log = get_logger(__name__)


def _f(default: Any, help: str, choices: tuple | None = None):
    """A dataclass field with documentation (and optional allowed values) attached."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(None, "Local path or hub name of a causal LM (Qwen3, Llama-3/3.1, ...). "
                                        "Exclusive with `from_config`.")
    from_config: str | None = _f("tiny-qwen3", "Build a randomly initialised model instead of loading weights: "
                                               "`tiny-qwen3` (hidden 64, 2 layers, for tests and the default run) or "
                                               "a directory holding a config.json.")
    config_overrides: dict = _f({}, "Keys set on the model config before building it (e.g. num_hidden_layers).")
    tokenizer: str | None = _f(None, "Tokenizer path or hub name; `tiny` = the offline tiny tokenizer. "
                                     "Default: `name_or_path` if set, else `tiny`.")
    dtype: str = _f("auto", "Parameter/compute dtype. `auto` = bfloat16 on GPU, float32 on CPU.",
                    ("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = _f("auto", "`auto` = flash_attention_2 when flash-attn and a GPU are present, else sdpa.",
                                  ("auto", "sdpa", "flash_attention_2", "eager"))
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    tiled_mlp: int = _f(0, "Run each decoder MLP over this many consecutive tiles of the row (DeepSpeed ALST's "
                           "sequence-tiled compute): the (tokens x intermediate) activations exist for one tile at "
                           "a time, and the MLP is recomputed in backward. For very long rows; 0 = off. ALST uses "
                           "about (tokens per rank) / hidden_size tiles.")
    trust_remote_code: bool = _f(False, "Passed to transformers when loading `name_or_path`.")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "Train a LoRA adapter (peft). false = full fine-tuning.")
    r: int = _f(8, "LoRA rank (ThinkRec paper default 8).")
    alpha: int = _f(16, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list = _f(["q_proj", "v_proj"], "Module names that get an adapter.")


@dataclass
class DataConfig:
    train: str | list = _f("bundled", "Training JSONL/Parquet path, or `bundled` for the sample data shipped with "
                                      "distthink. A list of sources is a mixture drawn in proportion to their "
                                      "weights: `[{path: a.jsonl, weight: 0.2}, {path: b.jsonl, weight: 0.8}]`; a "
                                      "source may carry `name` and the task's `options` (docs/data.md, Mixtures).")
    eval: str | None = _f("bundled", "Held-out JSONL/Parquet path, `bundled`, or null for no evaluation.")
    max_length: int = _f(1024, "Longest encoded sample in tokens (longer samples follow `policy.truncation`).")
    on_error: str = _f(ON_ERROR_DEFAULT, "Malformed samples: `skip` (counted and reported) or `raise`.",
                       ON_ERROR_CHOICES)
    max_train_samples: int = _f(0, "Use only the first N records of the train split (0 = all). For smoke runs.")
    max_eval_samples: int = _f(0, "Use only the first N records of the eval split (0 = all).")
    policy: dict = _f({}, "Keyword arguments of distthink.data.chat.ChatPolicy (think, think_weight, "
                          "enable_thinking, ...). Checked against ChatPolicy at start-up.")
    cache_dir: str = _f("auto", "Where encoded splits are cached (docs/data.md, large datasets), shared by every run "
                                "that encodes the same data the same way. `auto` = $DISTTHINK_CACHE_DIR, else "
                                "$XDG_CACHE_HOME/distthink/data, else ~/.cache/distthink/data. On a cluster, point it "
                                "at a shared scratch filesystem (or a node-local disk with cache_scope=node).")
    cache_scope: str = _f("global", "Which processes write a missing cache entry: `global` = rank 0 (cache_dir on a "
                                    "filesystem all nodes share), `node` = local rank 0 of each node (node-local "
                                    "disks). The others wait, then every rank reads the same files.",
                          ("global", "node"))
    num_proc: int = _f(0, "Processes that encode a split into the cache. 0 = the cores this process may use "
                          "(os.sched_getaffinity).")


@dataclass
class BatchConfig:
    mode: str = _f("tokens", "`tokens`: micro-batches packed up to `max_tokens` tokens; `samples`: exactly "
                             "`samples_per_micro` samples per micro-batch.", ("tokens", "samples"))
    max_tokens: int = _f(2048, "Token budget of one packed micro-batch (mode=tokens).")
    samples_per_micro: int = _f(1, "Samples per micro-batch (mode=samples).")
    gradient_accumulation: int = _f(1, "Micro-batches per optimizer step on each rank.")
    packing: bool = _f(True, "Padding-free packing of several samples in one row. false = one padded row per sample.")
    shuffle: bool = _f(True, "Shuffle samples every epoch (seeded by train.seed and the epoch).")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/default", "Where checkpoints, metrics.jsonl, TensorBoard logs and loss.png go.")
    max_steps: int = _f(30, "Optimizer steps. 0 = run `epochs` epochs.")
    epochs: int = _f(1, "Epochs when max_steps is 0.")
    lr: float = _f(2e-3, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    warmup_steps: int = _f(3, "Linear warm-up steps.")
    scheduler: str = _f("cosine", "Learning-rate schedule after warm-up.", ("cosine", "linear", "constant"))
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    seed: int = _f(42, "Seed of model init, data order and dropout.")
    device: str = _f("auto", "`auto` = cuda when available, else cpu.", ("auto", "cpu", "cuda"))
    cpu_threads: int = _f(0, "torch intra-op threads per process on CPU. 0 = $OMP_NUM_THREADS when set, else 1 "
                             "(small models lose far more to thread contention than they gain, most of all on a "
                             "shared machine: the default run took 7x longer with 2 threads on a busy 2-core box).")
    nan_max_consecutive: int = _f(5, "Stop after this many non-finite loss/grad-norm steps in a row (each is skipped).")


@dataclass
class LossConfig:
    impl: str = _f("fused", "`fused` = distthink.ops fused linear cross-entropy on hidden states (no logits "
                            "materialised); `hf` = logits + plain weighted cross-entropy (reference).", ("fused", "hf"))
    chunk_size: int = _f(1024, "Rows per chunk of the fused loss.")


@dataclass
class EvalConfig:
    every_steps: int = _f(10, "Evaluate on the held-out split every N optimizer steps (0 = only at the end).")
    max_batches: int = _f(0, "Limit eval micro-batches per rank (0 = whole split).")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "Save a resumable checkpoint every N steps (0 = only at the end / on preemption).")
    final: bool = _f(True, "Save a resumable checkpoint when the run ends. false for benchmarks: the final checkpoint "
                           "of a full fine-tune holds the optimizer state (tens of GB at 1.7B parameters).")
    keep_last: int = _f(2, "Keep this many step checkpoints (the `latest` one is never deleted).")
    resume: str = _f("auto", "`auto` = resume from output_dir/checkpoints/latest when it exists; `never`; or a "
                             "checkpoint directory.")
    export: str = _f("auto", "Final export: `auto` (adapter with LoRA, full model otherwise), `adapter`, `full` "
                             "(consolidated 16-bit safetensors; a LoRA run is merged into the base weights) or "
                             "`none`.", ("auto", "adapter", "full", "none"))
    export_dtype: str = _f("bfloat16", "dtype of the exported full model.", ("bfloat16", "float16", "float32"))
    allow_config_change: bool = _f(False, "Resume a checkpoint even though the run's meaning changed (model, LoRA "
                                          "shape, task, data sources or their bytes, encoding, seed). By default "
                                          "such a relaunch is refused at start-up.")


@dataclass
class DistributedConfig:
    deepspeed: str | None = _f(None, "DeepSpeed JSON (e.g. ds_configs/zero3.json). null = plain DDP / single process.")
    backend: str = _f("auto", "Process-group backend: `auto` = nccl on GPU, gloo on CPU.", ("auto", "gloo", "nccl"))
    timeout_s: int = _f(1800, "Process-group timeout in seconds.")
    sequence_parallel: int = _f(1, "Ulysses sequence parallelism (DeepSpeed ALST): each packed row is split into this "
                                   "many shards on as many ranks, which exchange heads for sequence in every "
                                   "attention layer; the loss, its normalisation and the think modes stay exact. "
                                   "1 = off. Needs DeepSpeed ZeRO-2/3, batch.packing, loss.impl=fused, sdpa or "
                                   "flash-attn, a task that supports it (sft), and N dividing the launched processes "
                                   "and the attention heads. Data parallelism is over world / N groups. See "
                                   "docs/training.md, 'Long sequences'.")


@dataclass
class LoggingConfig:
    every_steps: int = _f(1, "Log metrics every N steps.")
    progress: bool = _f(True, "tqdm progress bar on rank 0.")
    tensorboard: bool = _f(True, "TensorBoard logs under output_dir/tb (accelerate tracker).")
    wandb: bool = _f(False, "Also log to Weights & Biases (needs wandb installed and configured).")
    plot: bool = _f(True, "Write output_dir/loss.png at the end.")


@dataclass
class TaskConfig:
    name: str = _f("sft", "The recipe variant (distthink/engine/task.py): `sft` = reasoning-aware chat SFT.")
    options: dict = _f({}, "Task-specific settings, validated by the task at start-up (see its docs).")


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Loading: defaults <- YAML file <- overrides, each key checked against the dataclasses.
# ----------------------------------------------------------------------------------------------------

def default_yaml_text() -> str:
    """The embedded default config (package data), so `python -m distthink.train` needs no file."""
    return resources.files("distthink").joinpath("configs/default.yaml").read_text()


def _allowed_types(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return tuple(t for a in typing.get_args(tp) for t in _allowed_types(a))
    if tp is type(None):
        return (type(None),)
    return (origin or tp,)


def _check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(_OWNER[id(f)])
    allowed = _allowed_types(hints[f.name])
    if isinstance(value, bool) and bool not in allowed:
        # bool is an int subclass in Python; `lora.r: true` is a mistake, not 1.
        raise ConfigError(f"config key '{key}' must be {_type_names(allowed)}, got a boolean ({value!r}). "
                          f"Fix: set {key} to {_type_names(allowed)}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in allowed and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` as a string; accept the number users mean.
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, allowed):
        raise ConfigError(f"config key '{key}' must be {_type_names(allowed)}, got {type(value).__name__} "
                          f"({value!r}). Fix: set {key} to {_type_names(allowed)}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(choices)}. "
                          f"Fix: use one of {', '.join(map(str, choices))}")
    return value


def _type_names(allowed: tuple) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in allowed)


_OWNER: dict[int, type] = {}


def _register_owners(cls) -> None:
    for f in dataclasses.fields(cls):
        _OWNER[id(f)] = cls
        sub = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            _register_owners(sub)


_register_owners(Config)


def _merge_into(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got "
                          f"{type(data).__name__}. Fix: write it as `key: value` lines")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{dotted}'. Fix: remove it or rename it; {hint}")
        f = fields[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value if value is not None else {}, dotted + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            # Free-form mappings (task.options, data.policy) merge key by key, so that an override such as
            # task.options.lr_scale=2 changes one option instead of replacing the YAML's whole mapping.
            setattr(obj, key, _deep_merge(current, value))
        else:
            setattr(obj, key, _check_value(dotted, value, f))


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """`["train.lr=1e-4", "lora.enabled=false"]` -> nested dict, values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value. Fix: write e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err}). Fix: quote it") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist. Fix: pass an existing YAML file to --config "
                          f"(examples in configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{p}' is not valid YAML: {err}") from None
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Build and validate the run config: embedded default <- `path` <- `overrides`."""
    cfg = Config()
    _merge_into(cfg, yaml.safe_load(default_yaml_text()) or {})
    if path is not None:
        _merge_into(cfg, _read_yaml(path))
    if overrides:
        _merge_into(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def load_options(cls, raw: dict | None, prefix: str, *, deprecated: dict[str, str] | None = None):
    """A task's options dataclass from `task.options`, checked like the main config: an unknown key gets "did you
    mean", a wrong type or a value outside a field's `choices` names the key and the fix.

    deprecated: old key -> its message (the new name); such a key is dropped from `raw` with one warning line
    each (accepted for one release), and the caller maps its value."""
    raw = dict(raw or {})
    for old, message in (deprecated or {}).items():
        if old in raw:
            warn_deprecated(f"{prefix}{old}", message)
    raw = {k: v for k, v in raw.items() if k not in (deprecated or {})}
    if id(dataclasses.fields(cls)[0]) not in _OWNER:
        _register_owners(cls)
    opts = cls()
    _merge_into(opts, raw, prefix)
    return opts


_warned: set[str] = set()


def warn_deprecated(key: str, message: str) -> None:
    """One line per deprecated spelling and process: what to write instead, and when the old one goes."""
    if key not in _warned:
        _warned.add(key)
        log.warning("config key '%s' is deprecated: %s (the old spelling is accepted until distthink 0.3)", key,
                    message)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy saved in a checkpoint)."""
    cfg = Config()
    _merge_into(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Refuse impossible combinations, naming the keys involved and the fix."""
    m = cfg.model
    if m.name_or_path and m.from_config:
        raise ConfigError("model.name_or_path and model.from_config are both set. Fix: keep one (set the other "
                          "to null), e.g. model.from_config=null to load pretrained weights")
    if not m.name_or_path and not m.from_config:
        raise ConfigError("neither model.name_or_path nor model.from_config is set. Fix: set one of them")
    positive = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "data.max_length": cfg.data.max_length,
                "batch.max_tokens": cfg.batch.max_tokens, "batch.samples_per_micro": cfg.batch.samples_per_micro,
                "batch.gradient_accumulation": cfg.batch.gradient_accumulation,
                "loss.chunk_size": cfg.loss.chunk_size, "distributed.timeout_s": cfg.distributed.timeout_s,
                "distributed.sequence_parallel": cfg.distributed.sequence_parallel,
                "logging.every_steps": cfg.logging.every_steps,
                "train.nan_max_consecutive": cfg.train.nan_max_consecutive}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}. Fix: use a positive value")
    nonneg = {"train.max_steps": cfg.train.max_steps, "train.warmup_steps": cfg.train.warmup_steps,
              "eval.every_steps": cfg.eval.every_steps, "checkpoint.every_steps": cfg.checkpoint.every_steps,
              "checkpoint.keep_last": cfg.checkpoint.keep_last, "train.max_grad_norm": cfg.train.max_grad_norm,
              "train.lr": cfg.train.lr, "train.weight_decay": cfg.train.weight_decay,
              "eval.max_batches": cfg.eval.max_batches, "train.epochs": cfg.train.epochs,
              "train.cpu_threads": cfg.train.cpu_threads, "data.max_train_samples": cfg.data.max_train_samples,
              "data.max_eval_samples": cfg.data.max_eval_samples, "model.tiled_mlp": cfg.model.tiled_mlp,
              "data.num_proc": cfg.data.num_proc}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}. Fix: use 0 or a positive value")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("train.max_steps and train.epochs are both 0: nothing to train. Fix: set one of them")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas must have two numbers, got {cfg.train.betas}")
    parse_sources(cfg.data.train)  # a mixture's structure (paths, weights > 0, distinct names)
    if cfg.batch.mode == "tokens" and cfg.batch.max_tokens < cfg.data.max_length:
        raise ConfigError(f"batch.max_tokens ({cfg.batch.max_tokens}) < data.max_length ({cfg.data.max_length}): "
                          "a full-length sample could never fit in a micro-batch. Fix: raise batch.max_tokens or "
                          "lower data.max_length")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise ConfigError("lora.enabled is true but lora.target_modules is empty. Fix: list modules, e.g. "
                          "[q_proj, v_proj], or set lora.enabled=false")
    if cfg.checkpoint.export == "adapter" and not cfg.lora.enabled:
        raise ConfigError("checkpoint.export=adapter needs lora.enabled=true (full fine-tuning has no adapter). "
                          "Fix: use checkpoint.export=full or auto")
    if cfg.train.device == "cpu" and cfg.model.dtype in ("float16",):
        raise ConfigError("model.dtype=float16 on CPU is not supported. Fix: use float32 or bfloat16 on CPU")
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.train.device == "cpu":
        raise ConfigError("model.attn_implementation=flash_attention_2 needs a GPU. Fix: use sdpa or auto on CPU")
    ds = cfg.distributed.deepspeed
    if ds is not None:
        if not Path(ds).is_file():
            raise ConfigError(f"distributed.deepspeed='{ds}' does not exist. Fix: point it at a JSON file such as "
                              "ds_configs/zero3.json, or set it to null")
        if cfg.distributed.backend == "nccl" and cfg.train.device == "cpu":
            raise ConfigError("distributed.backend=nccl with train.device=cpu. Fix: use backend gloo or auto")
    if cfg.distributed.backend == "nccl" and cfg.train.device == "cpu":
        raise ConfigError("distributed.backend=nccl needs GPUs but train.device=cpu. Fix: use gloo or auto")
    if cfg.distributed.sequence_parallel > 1:
        _validate_sequence_parallel(cfg)
    if cfg.logging.wandb:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb=true but wandb is not installed. Fix: pip install wandb (and "
                              "`wandb login`), or set logging.wandb=false")
    res = cfg.checkpoint.resume
    if res not in ("auto", "never") and not Path(res).exists():
        raise ConfigError(f"checkpoint.resume='{res}' does not exist. Fix: use auto, never, or an existing "
                          "checkpoint directory")


def _validate_sequence_parallel(cfg: Config) -> None:
    """What distributed.sequence_parallel > 1 needs from the config alone (the launch, task and model shape are
    checked at start-up by distthink.engine.sequence_parallel.check_run)."""
    n = cfg.distributed.sequence_parallel
    key = f"distributed.sequence_parallel={n}"
    if not cfg.distributed.deepspeed:
        raise ConfigError(f"{key} runs on DeepSpeed (Ulysses/ALST). Fix: set distributed.deepspeed to "
                          "ds_configs/zero3.json (or zero2.json)")
    stage = zero_stage_of(cfg)
    if stage not in (2, 3):
        raise ConfigError(f"{key} with ZeRO stage {stage}: sequence parallelism is supported with ZeRO-2 and "
                          "ZeRO-3 (DeepSpeed reduces its gradients over the sequence-data-parallel group there). "
                          "Fix: use ds_configs/zero2.json or ds_configs/zero3.json")
    zero = read_deepspeed_json(cfg.distributed.deepspeed).get("zero_optimization", {})
    if stage == 3 and zero.get("reduce_scatter", True) is False:
        raise ConfigError(f"{key} with ZeRO-3 and reduce_scatter=false: DeepSpeed then averages some gradient "
                          "buckets over the data-parallel ranks and others over all ranks, and no loss scale is exact. "
                          "Fix: remove reduce_scatter from the JSON (it defaults to true)")
    if not cfg.batch.packing:
        raise ConfigError(f"{key} needs batch.packing=true: Ulysses shards one row per micro-batch. Fix: set "
                          "batch.packing=true")
    if cfg.loss.impl != "fused":
        raise ConfigError(f"{key} needs loss.impl=fused (the hf loss materialises the logits of the whole shard "
                          "and has no cross-shard think state). Fix: set loss.impl=fused")
    if cfg.model.attn_implementation == "eager":
        raise ConfigError(f"{key} cannot run eager attention (Ulysses hands the core attention no mask). Fix: set "
                          "model.attn_implementation to auto, sdpa or flash_attention_2")


# ----------------------------------------------------------------------------------------------------
# Resolving "auto": the one place where a run's device, dtypes, attention and DeepSpeed settings are decided.
# The trainer, the model loader, `rec eval` and `distthink plan` all ask here; none re-derives a rule.
# ----------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere or newer
# What "auto" becomes for DeepSpeed's bucket sizes. accelerate derives them from the hidden size; fixed
# values are fine for any model, and `distthink plan` models exactly these.
ZERO_AUTO_BUCKETS = {"reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7,
                     "stage3_param_persistence_threshold": 1e4}


def device_for(requested: str, key: str = "train.device") -> str:
    """A device setting (`auto`, `cpu`, `cuda`, `cuda:N`; the trainer's train.device, `generate --device`):
    `auto` = cuda when a GPU is visible, else cpu. `key` names the setting in the error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", requested):
        raise ConfigError(f"{key}={requested!r} is not a device. Fix: use auto, cpu, cuda or cuda:N")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={requested} but no CUDA device is visible. Fix: use {key}=cpu or auto")
    return requested


def dtype_for(requested: str, device: str) -> torch.dtype:
    """A dtype setting (model.dtype, `generate --dtype`): `auto` = bfloat16 on GPU, float32 on CPU."""
    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[requested]


def resolve_device(cfg: Config) -> str:
    """train.device: `auto` = cuda when a GPU is visible, else cpu."""
    return device_for(cfg.train.device)


def resolve_dtype(cfg: Config, device: str | None = None) -> torch.dtype:
    """The compute dtype: model.dtype, `auto` = bfloat16 on GPU, float32 on CPU."""
    if cfg.model.dtype == "auto":
        return dtype_for("auto", device or resolve_device(cfg))
    return DTYPES[cfg.model.dtype]


def uses_autocast(cfg: Config) -> bool:
    """Full fine-tuning in 16-bit without DeepSpeed: keep fp32 weights (the optimizer's master copy) and
    run the forward under autocast. Pure bf16 AdamW would round small updates away. DeepSpeed keeps
    its own fp32 master weights (so the model is loaded in 16-bit), and LoRA trains fp32 adapters on a
    frozen 16-bit base (peft upcasts adapter weights), so neither needs it."""
    return resolve_dtype(cfg) != torch.float32 and not cfg.distributed.deepspeed and not cfg.lora.enabled


def param_dtype(cfg: Config) -> torch.dtype:
    """The dtype the model's parameters are loaded in (see uses_autocast)."""
    return torch.float32 if uses_autocast(cfg) else resolve_dtype(cfg)


def training_autocast(cfg: Config, device_type: str):
    """The autocast the trainer's forward runs under (accelerate's mixed_precision, see uses_autocast), for code
    that runs the model outside that forward: the molecule task's free-mode generation runs fp32 weights whose
    attention was chosen for 16-bit compute (flash-attn refuses fp32). A no-op context when the run has none."""
    if not uses_autocast(cfg):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=resolve_dtype(cfg, device_type))


def flash_attention_blocker(device: str, compute_dtype: torch.dtype, *, installed: bool | None = None,
                            capability: tuple[int, int] | None = None) -> str | None:
    """Why flash-attn 2 cannot run a model whose attention computes in `compute_dtype` on `device`, or None.

    flash-attn runs on CUDA only, in fp16/bf16 only (an fp32 model, or one outside autocast, is refused by its
    kernels), on sm >= 8.0. `installed` / `capability` default to this machine (tests pass them)."""
    if device != "cuda":
        return f"it runs on CUDA only (device={device})"
    if compute_dtype not in (torch.float16, torch.bfloat16):
        return f"it runs in float16/bfloat16 only (the model computes in {str(compute_dtype).replace('torch.', '')})"
    if installed is None:
        installed = has_flash_attn()
    if not installed:
        return "flash-attn is not installed (pip install 'distthink[gpu]')"
    if capability is None:
        capability = torch.cuda.get_device_capability()
    if tuple(capability) < FLASH_MIN_CAPABILITY:
        return f"it needs an Ampere or newer GPU (sm >= 8.0; this one is sm {capability[0]}.{capability[1]})"
    return None


def resolve_attention(requested: str, device: str, compute_dtype: torch.dtype, *, installed: bool | None = None,
                      capability: tuple[int, int] | None = None) -> str:
    """model.attn_implementation: `auto` = flash_attention_2 where it can run (flash_attention_blocker), else sdpa.
    An explicit flash_attention_2 that cannot run is a ConfigError before any model is built."""
    blocker = flash_attention_blocker(device, compute_dtype, installed=installed, capability=capability)
    if requested == "flash_attention_2" and blocker:
        raise ConfigError(f"model.attn_implementation=flash_attention_2 cannot run here: {blocker}. "
                          "Fix: use model.attn_implementation=auto (or sdpa)")
    if requested != "auto":
        return requested
    return "sdpa" if blocker else "flash_attention_2"


def resolve_cache_dir(cfg: Config) -> Path:
    """data.cache_dir: `auto` = $DISTTHINK_CACHE_DIR, else $XDG_CACHE_HOME/distthink/data, else
    ~/.cache/distthink/data."""
    if cfg.data.cache_dir != "auto":
        return Path(cfg.data.cache_dir).expanduser()
    if os.environ.get("DISTTHINK_CACHE_DIR"):
        return Path(os.environ["DISTTHINK_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "distthink" / "data"


def resolve_num_proc(cfg: Config) -> int:
    """data.num_proc: 0 = the cores this process may run on (its affinity mask: SLURM's --cpus-per-task, taskset)."""
    if cfg.data.num_proc:
        return cfg.data.num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def world_size_of_launch() -> int:
    """Processes of this launch (torchrun/accelerate set WORLD_SIZE; a plain `python` run is 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def read_deepspeed_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"distributed.deepspeed='{path}' cannot be read as JSON: {err}. Fix: point it at a "
                          "valid JSON file such as ds_configs/zero3.json") from None


def zero_stage_of(cfg: Config) -> int:
    """The ZeRO stage the run's DeepSpeed JSON asks for (0 without DeepSpeed)."""
    if not cfg.distributed.deepspeed:
        return 0
    return int(read_deepspeed_json(cfg.distributed.deepspeed).get("zero_optimization", {}).get("stage", 0))


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """The run's DeepSpeed JSON with every "auto" filled and every batch field checked against the run.

    One packed row per micro-batch (the token budget, not the row count, sizes a micro-batch), so
    train_micro_batch_size_per_gpu = 1, gradient_accumulation_steps = batch.gradient_accumulation and
    train_batch_size = (world_size / distributed.sequence_parallel) x GA (the ranks of a sequence-parallel group
    share one row). A number that disagrees, or a ZeRO stage that cannot do the offload the
    JSON asks for, is a ConfigError with the fix, raised before any process group or model exists.
    `load_universal`: the resumed checkpoint is loaded from DeepSpeed's universal form (distthink.engine.reshard)."""
    path = cfg.distributed.deepspeed
    ds = copy.deepcopy(read_deepspeed_json(path))
    ga = cfg.batch.gradient_accumulation
    sp = cfg.distributed.sequence_parallel
    dp = max(world_size // sp, 1)
    fill = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": ga,
            "train_batch_size": dp * ga, "gradient_clipping": cfg.train.max_grad_norm}
    meaning = {"train_micro_batch_size_per_gpu": "one packed row per micro-batch (batch.max_tokens sizes it)",
               "gradient_accumulation_steps": f"batch.gradient_accumulation={ga}",
               "train_batch_size": f"{dp} data-parallel rank(s) x 1 row x {ga} micro-batches (GA)"
                                   + (f" (sequence_parallel={sp} ranks share a row)" if sp > 1 else ""),
               "gradient_clipping": f"train.max_grad_norm={cfg.train.max_grad_norm}"}
    for key, value in fill.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif key != "gradient_clipping" and given != value:
            raise ConfigError(f"{path}: {key}={given} does not fit this run, which needs {value}: {meaning[key]}. "
                              f"Fix: set \"{key}\": \"auto\" in the JSON (distthink fills it)")
    dtype = resolve_dtype(cfg)
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage}. Fix: use 0, 1, 2 or 3")
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if offload_param and stage != 3:
        raise ConfigError(f"{path}: offload_param needs ZeRO stage 3 (the JSON has stage {stage}): only stage 3 "
                          "partitions the parameters it would offload. Fix: set zero_optimization.stage to 3, or "
                          "remove offload_param")
    if offload_opt and stage < 1:
        raise ConfigError(f"{path}: offload_optimizer needs ZeRO stage 1-3 (the JSON has stage {stage}). Fix: set "
                          "zero_optimization.stage to 2 or 3, or remove offload_optimizer")
    for key, value in ZERO_AUTO_BUCKETS.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if sp > 1:
        # zero.Init builds its DeepSpeedConfig before any SP group exists: this key is how it learns that the
        # batch fields above count data-parallel ranks (world / N), as the engine's own config will with the mpu.
        ds["sequence_parallel_size"] = sp
    # We build our own torch optimizer/scheduler (also with CPU offload): DeepSpeed must not insist on
    # its C++ CPU-Adam, which needs a compiler at run time.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    for key in ("optimizer", "scheduler"):
        if ds.get(key) == "auto":
            ds.pop(key)
    if load_universal:
        ds["checkpoint"] = {**(ds.get("checkpoint") or {}), "load_universal": True}
    return ds


# ----------------------------------------------------------------------------------------------------
# Documentation: docs/configuration.md is generated from the dataclasses above.
# ----------------------------------------------------------------------------------------------------

def markdown_reference() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `distthink/config.py` (`python -m distthink.config --markdown > docs/configuration.md`).",
             "Every key below can be set in a YAML file (`--config FILE`) or on the command line as a dotted",
             "override (`train.lr=1e-4`). Unknown keys, wrong types and impossible combinations are refused at",
             "start-up with a message naming the key and the fix.", ""]
    cfg = Config()
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        lines += [f"## `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            tp = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "").replace(" | ", " or ")
            default = getattr(sub, f.name)
            text = f.metadata["help"]
            if f.metadata.get("choices"):
                text += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            lines.append(f"| `{section.name}.{f.name}` | {tp} | `{default!r}` | {text} |")
        lines.append("")
    lines += ["## The embedded default (`distthink/configs/default.yaml`)", "", "```yaml",
              default_yaml_text().rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_reference())
    else:
        print(yaml.safe_dump(load_config(None, sys.argv[1:]).to_dict(), sort_keys=False))
