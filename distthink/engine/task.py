"""The task protocol: what a recipe variant changes, so that every objective shares one training loop.

train.py owns the loop: distributed setup, the micro-batch plan, the exact global normalisation,
checkpoints, preemption, logging. A task (a module under distthink/tasks/) owns what differs between
reasoning SFT, ThinkRec and molecule captioning:

- `__init__(cfg)`: validate `task.options` (ConfigError with the fix). It runs at start-up, before any
  process group, model or data exists, so a typo costs nothing;
- `prepare_tokenizer`: add placeholder tokens (`<UserID>`, `<|graph|>`, ...) before the model is built;
- `split_encoding(split, tokenizer, source=None)`: how a split is encoded (distthink.data.parallel_encode.
  SplitEncoding): its sources, a streaming record reader, a picklable per-record encoder returning EncodedSamples
  (side inputs go into `meta`), the meta columns with their kinds, and the task options that change the
  encoding. `source` replaces the path of `data.<split>` (one source of a mixture, distthink/data/mixture.py).
  The engine (engine/batching.load_split) encodes it once, in parallel, into the shared cache and hands the
  recipe a lazily read sequence; a task never keeps a split in memory;
- `collator`: micro-batch dict (the packing contract in distthink/data/packing.py) plus side inputs;
- `wrap_model`: the module handed to accelerate/DeepSpeed, built on the engine's LM-head loss part
  (distthink.engine.lm_loss.LMHeadLoss). Any extra trainable module (projector, graph encoder) must be a
  submodule of it so that ZeRO partitions, reduces and checkpoints it;
- `forward`: run the wrapped module on one micro-batch and return a dict of *unnormalised loss sums*;
- `norms`: the matching local normalisers of a micro-batch.
- optional `save_extra(accelerator, wrapped, export_dir)`: collective, after the export, for side modules the
  LM export does not hold (the molecule task writes its graph encoder + projector there).
- optional `on_step_start(step, model, train_set, indices)`: called before a step's micro-batches are
  collated, with the unwrapped module and the train-set indices this rank uses in the step; it may replace
  `train_set[i]` for those indices (on-policy data: the molecule task's `think_mode: free` generates thoughts).

Normalisation contract. For each key k in `loss_keys`, the loss of an optimizer step is

    L_k = sum over all micro-batches of all ranks of sums[k]  /  sum over the same of norms[k]

and the step minimises sum_k L_k. The trainer all-reduces the norms of the step's micro-batches before
the first forward, so every term is normalised by its *global* total (see distthink/engine/lm_loss.py). For
SFT there is one key, "lm": the weighted token loss over the global token-weight total. A task with a
second objective (ThinkRec's BCE on the "Yes" logit) adds a key normalised by its own count.

Finding a task. `task.name` is a name of the registry in distthink/tasks/__init__.py (`BUILTIN_TASKS`) or
`package.module:Class` for a task of your own. The engine looks the registry up by name at run time, the way
a plugin is found, so the core never imports a task and a new task needs no edit here.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch

from distthink.config import Config
from distthink.data.mixture import parse_sources
from distthink.data.parallel_encode import SplitEncoding
from distthink.errors import ConfigError

TASK_REGISTRY_MODULE = "distthink.tasks"


class Task(Protocol):
    """The methods the recipe calls (see the module docstring); optional hooks are looked up with hasattr."""

    name: str
    loss_keys: tuple[str, ...]

    def prepare_tokenizer(self, tokenizer) -> None: ...

    def split_encoding(self, split: str, tokenizer, source: str | None = None) -> SplitEncoding: ...
    # A task whose sources of a mixture may carry `options` names the keys in `source_options` and takes them as
    # split_encoding(..., source_options={...}); it is called with that keyword only when a source has options.

    def collator(self, tokenizer) -> Callable[[list], dict]: ...

    def wrap_model(self, model, tokenizer) -> torch.nn.Module: ...

    def forward(self, wrapped, batch: dict, attn_impl: str, dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def norms(self, batch: dict) -> dict[str, float]: ...


def builtin_tasks() -> dict[str, str]:
    """name -> "module:Class" of the tasks shipped with distthink."""
    return dict(importlib.import_module(TASK_REGISTRY_MODULE).BUILTIN_TASKS)


def task_class(name: str) -> type:
    """The class named by `task.name`: a registry name, or `package.module:Class`."""
    known = builtin_tasks()
    spec = known.get(name, name)
    if ":" not in spec:
        raise ConfigError(f"task.name={name!r} is not a known task. Fix: use one of {sorted(known)}, or "
                          "`package.module:Class` for a task of your own")
    module, cls = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"task.name={name!r} cannot be imported ({err}). Fix: check the module path and "
                          "class name, and that the module is importable (PYTHONPATH)") from None


def make_task(cfg: Config) -> Task:
    """The task of this run, its options validated (ConfigError on a bad option), per-source options included."""
    cls = task_class(cfg.task.name)
    allowed = tuple(getattr(cls, "source_options", ()))
    for i, source in enumerate(parse_sources(cfg.data.train)):
        unknown = sorted(set(source.options) - set(allowed))
        if unknown:
            raise ConfigError(f"data.train[{i}] ({source.name}).options: {unknown} are not options of a source for "
                              f"task.name={cfg.task.name}. Fix: " + (f"use {list(allowed)}" if allowed else
                                                                     "remove `options` (this task takes none)"))
    return cls(cfg)
