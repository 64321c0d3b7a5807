"""Process-group set-up and teardown through accelerate, with the CPU traps handled.

Three traps this module exists for:
- On CPU, accelerate must create the process group with backend gloo (`InitProcessGroupKwargs`);
  otherwise every rank can believe it is rank 0. `setup()` passes it and checks the ranks are distinct.
- Processes can abort at interpreter exit ("terminate called without an active exception") when the
  process group / DeepSpeed engine are still alive. `teardown()` ends trackers, destroys the group and
  is safe to call twice.
- Destroying a gloo group right after its last collectives can deadlock: the destructor joins the group's
  worker threads while holding the GIL, and a worker still dropping the last finished work needs the GIL to
  release that work's tensors (ProcessGroupGloo::~ProcessGroupGloo in thread::join, the worker in
  gil_scoped_acquire). The last DDP reference dropped after destroy_process_group() does it: a requeued SLURM
  run and a ThinkRec run hung so in CI after all their work, and a bare two-rank DDP loop hangs in 3 of 5 tries
  (tests/engine/test_teardown.py). A rank of a launch therefore ends with `teardown(destroy=False)` and
  `leave()`: nothing of the group is destroyed before os._exit.

DeepSpeed: `distributed.deepspeed` names a JSON file whose "auto" values distthink.config.deepspeed_config
fills from the run (micro-batch = 1 packed row, gradient accumulation, clipping, bf16), so that the engine's
own gradient-accumulation scaling matches what distthink.engine.lm_loss expects. The plugin is created before
the model is built, so ZeRO-3 really partitions parameters at construction (`zero.Init`). A single process
without a launcher gets an env:// rendezvous of its own (DeepSpeed would otherwise look for MPI).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from typing import Any, NoReturn

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from distthink.config import (
    Config,
    deepspeed_config,
    resolve_device,
    resolve_dtype,
    uses_autocast,
    world_size_of_launch,
)
from distthink.engine.sequence_parallel import parallelism_config
from distthink.logging_utils import get_logger

log = get_logger(__name__)


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def setup(cfg: Config, log_with: list[str] | None = None, project_dir: str | None = None,
          load_universal: bool = False):
    """Create the Accelerator (and with it the process group). Returns it. `load_universal`: DeepSpeed will load
    the resumed checkpoint's universal form (another world size saved it: distthink.engine.reshard).

    Must run before the model is built: under ZeRO-3 the DeepSpeed plugin installs the config that makes
    `from_pretrained` / `from_config` construct partitioned parameters.
    """
    device = resolve_device(cfg)
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        threads = cfg.train.cpu_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
        torch.set_num_threads(threads)
    world = world_size_of_launch()
    if cfg.distributed.deepspeed and "LOCAL_RANK" not in os.environ:
        single_process_rendezvous()
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
        ds = deepspeed_config(cfg, world, load_universal)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=True)
        # distributed.sequence_parallel > 1: accelerate registers DeepSpeed's Ulysses attention at prepare()
        kwargs["parallelism_config"] = parallelism_config(cfg, world, device, resolve_dtype(cfg, device))
    elif device == "cpu":
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    ranks = _check_distinct_ranks(accelerator)
    log.info("%d process(es) on %s (%s backend%s)%s", accelerator.num_processes, accelerator.device.type, backend,
             f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if cfg.distributed.deepspeed else "",
             f", ranks {ranks} distinct" if len(ranks) > 1 else "")
    return accelerator


def single_process_rendezvous() -> None:
    """Make a plain `python -m distthink.train` (or `distthink train`) a one-process torch.distributed job.

    DeepSpeed needs a process group; without a launcher's RANK/WORLD_SIZE/MASTER_* it falls back to MPI
    discovery (mpi4py, usually absent). Setting the env:// variables for rank 0 of 1, on a free local port,
    is exactly what `torchrun --nproc_per_node 1` would do."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    log.info("DeepSpeed in a single process: env:// rendezvous on 127.0.0.1:%s (what torchrun would set)", port)


def _check_distinct_ranks(accelerator) -> list[int]:
    """Every rank must know a different index, or all ranks would train on the same shard. Returns the ranks."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1 and accelerator.num_processes != env_world:
        raise RuntimeError(f"launched {env_world} processes but accelerate sees {accelerator.num_processes}: the "
                           "process group was not created (on CPU the backend must be gloo)")
    ranks = all_gather_object(accelerator.process_index) if accelerator.num_processes > 1 else [0]
    if sorted(ranks) != list(range(accelerator.num_processes)):
        raise RuntimeError(f"ranks are not distinct across processes: {ranks}")
    return ranks


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


# What a rank that ends with leave() keeps alive until os._exit (the module docstring says why).
_KEPT_UNTIL_EXIT: list = []


def teardown(accelerator=None, *, destroy: bool = True) -> None:
    """End trackers and destroy the process group. Idempotent; call it on every exit path.

    destroy=False, for a rank that calls leave() next: the trackers end, and the accelerator (with the models,
    optimizer and engine that hold the group) is kept alive, so that no destructor touches the group."""
    if not destroy:
        if accelerator is not None:
            for tracker in accelerator.trackers:
                tracker.finish()
            _KEPT_UNTIL_EXIT.append(accelerator)
        return
    try:
        if accelerator is not None:
            accelerator.end_training()  # stops trackers; in accelerate>=1.x also destroys the group
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched_rank() -> bool:
    """This process is one of several started by a launcher (torchrun / accelerate launch / srun)."""
    return world_size_of_launch() > 1


def leave(code: int) -> NoReturn:
    """End a rank of a launch without interpreter finalisation: flush, then os._exit.

    Everything the run owes the user (summary, checkpoint, export, the error line) is written by now. What is
    skipped are native destructors, which have aborted ("terminate called without an active exception", about 1
    two-rank ZeRO-3 run in 25) or deadlocked on a gloo group (module docstring) after all work was done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
