"""Process-group set-up and teardown through accelerate, with the CPU traps handled.

Two traps this module exists for:
- On CPU, accelerate must create the process group with backend gloo (`InitProcessGroupKwargs`);
  otherwise every rank can believe it is rank 0. `setup()` passes it and checks the ranks are distinct.
- Processes can abort at interpreter exit ("terminate called without an active exception") when the
  process group / DeepSpeed engine are still alive. `teardown()` ends trackers, destroys the group and
  is safe to call twice.

DeepSpeed: `distributed.deepspeed` names a JSON file. Its "auto" values are filled here from the run
config (micro-batch = 1 packed row, gradient accumulation, clipping, bf16) so that the engine's own
gradient-accumulation scaling matches what distthink.engine.lm_loss expects. The plugin is created before
the model is built, so ZeRO-3 really partitions parameters at construction (`zero.Init`).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
from typing import Any

import torch

from distthink.config import Config
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


def resolve_device(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible. Fix: use train.device=cpu or auto")
    return cfg.train.device


def resolve_dtype(cfg: Config) -> torch.dtype:
    """The compute dtype: model.dtype, `auto` = bfloat16 on GPU, float32 on CPU."""
    name = cfg.model.dtype
    if name == "auto":
        return torch.bfloat16 if resolve_device(cfg) == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def uses_autocast(cfg: Config) -> bool:
    """Full fine-tuning in 16-bit without DeepSpeed: keep fp32 weights (the optimizer's master copy) and
    run the forward under autocast. Pure bf16 AdamW would round small updates away. DeepSpeed keeps
    its own fp32 master weights (so the model is loaded in 16-bit), and LoRA trains fp32 adapters on a
    frozen 16-bit base (peft upcasts adapter weights), so neither needs it."""
    return (resolve_dtype(cfg) != torch.float32 and not cfg.distributed.deepspeed and not cfg.lora.enabled)


def param_dtype(cfg: Config) -> torch.dtype:
    """The dtype the model's parameters are loaded in (see uses_autocast)."""
    return torch.float32 if uses_autocast(cfg) else resolve_dtype(cfg)


def load_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Read the DeepSpeed JSON and replace every "auto" this run determines."""
    path = cfg.distributed.deepspeed
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"distributed.deepspeed='{path}' cannot be read as JSON: {err}") from None
    ds = copy.deepcopy(ds)
    ga = cfg.batch.gradient_accumulation
    fill = {
        # One packed row per micro-batch: the token budget, not the row count, sizes a micro-batch.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ga,
        "train_batch_size": world_size * ga,
        "gradient_clipping": cfg.train.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif key in ("gradient_accumulation_steps",) and ds[key] != value:
            raise ConfigError(f"{path}: gradient_accumulation_steps={ds[key]} disagrees with "
                              f"batch.gradient_accumulation={value}. Fix: set it to \"auto\" in the JSON")
    dtype = resolve_dtype(cfg)
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    zero = ds.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            # Values accelerate would derive from hidden size; fixed small values are fine for any model.
            zero[key] = {"reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7,
                         "stage3_param_persistence_threshold": 1e4}[key]
    # We build our own torch optimizer/scheduler (also with CPU offload): DeepSpeed must not insist on
    # its C++ CPU-Adam, which needs a compiler at run time.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.pop("optimizer", None) if ds.get("optimizer") == "auto" else None
    ds.pop("scheduler", None) if ds.get("scheduler") == "auto" else None
    return ds


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def setup(cfg: Config, log_with: list[str] | None = None, project_dir: str | None = None):
    """Create the Accelerator (and with it the process group). Returns it.

    Must run before the model is built: under ZeRO-3 the DeepSpeed plugin installs the config that makes
    `from_pretrained` / `from_config` construct partitioned parameters.
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    device = resolve_device(cfg)
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        threads = cfg.train.cpu_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = dict(
        gradient_accumulation_steps=cfg.batch.gradient_accumulation,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir),
        # 16-bit weights are set at load time (models.load); autocast only for full FT without DeepSpeed.
        mixed_precision=({torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype(cfg)]
                         if uses_autocast(cfg) else "no"),
    )
    if world > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1:
        # Launched by torchrun/accelerate: name the backend, or CPU ranks may all believe they are rank 0.
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(
            backend=backend, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))]
    if cfg.distributed.deepspeed:
        ds = load_deepspeed_config(cfg, world)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=True)
    elif device == "cpu":
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    _check_distinct_ranks(accelerator)
    log.info("process %d/%d on %s (%s backend%s)", accelerator.process_index, accelerator.num_processes,
             accelerator.device, backend,
             f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if cfg.distributed.deepspeed else "")
    return accelerator


def _check_distinct_ranks(accelerator) -> None:
    """Every rank must know a different index, or all ranks would train on the same shard."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1 and accelerator.num_processes != env_world:
        raise RuntimeError(f"launched {env_world} processes but accelerate sees {accelerator.num_processes}: the "
                           "process group was not created (on CPU the backend must be gloo)")
    if accelerator.num_processes > 1:
        ranks = all_gather_object(accelerator.process_index)
        if sorted(ranks) != list(range(accelerator.num_processes)):
            raise RuntimeError(f"ranks are not distinct across processes: {ranks}")


def all_gather_object(obj) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few floats across ranks in float64 (exact enough for weight totals of any run size)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # gloo reduces CPU tensors only; nccl needs them on the GPU.
        dev = "cpu" if torch.distributed.get_backend() == "gloo" else device
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(t)
    else:
        t = torch.tensor(values, dtype=torch.float64)
    return t.tolist()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def teardown(accelerator=None) -> None:
    """End trackers and destroy the process group. Idempotent; call it on every exit path."""
    try:
        if accelerator is not None:
            accelerator.end_training()  # stops trackers; in accelerate>=1.x also destroys the group
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
