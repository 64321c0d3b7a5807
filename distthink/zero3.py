"""The ZeRO-3 facts, each written once: is a parameter or model partitioned, its full size, a gather.

Every floor needs them (the fused op gathers the LM head, model loading copies an unpartitioned init, the
engine registers the head as an external parameter, task exports gather side modules), so they sit at the
base next to errors.py: ops stay standalone and nothing needs to import the engine for them.

DeepSpeed is imported only inside the functions that act on a partitioned parameter: importing it chooses
its accelerator once per process (DS_ACCELERATOR must be set first, which distthink.engine.distributed does),
and a run without ZeRO-3 never needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_zero3_param(param: torch.Tensor) -> bool:
    """A parameter managed by ZeRO-3 (partitioned or not at this moment)."""
    return hasattr(param, "ds_id")


def is_partitioned(model_or_params: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
    """True when ZeRO-3 has partitioned the parameters: a rank's local tensor is smaller than the parameter
    (shape (0,) until gathered), so no rank ever holds the full model."""
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return any(is_zero3_param(p) and p.data.numel() < p.ds_numel for p in params)


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, whether or not ZeRO-3 holds only a shard of it here."""
    return int(getattr(param, "ds_numel", param.numel()))


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block under ZeRO-3 (collective: every rank must enter); a no-op otherwise.

    modifier_rank=None: read-only. modifier_rank=r: rank r's in-place changes are broadcast and re-partitioned
    when the block ends."""
    params = list(params)
    if not any(is_zero3_param(p) for p in params):
        yield
        return
    import deepspeed  # only a ZeRO-3 run gets here (see the module docstring)

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def register_external_parameter(module: torch.nn.Module, param: torch.Tensor) -> None:
    """Tell ZeRO-3 that `module`'s forward reads `param`, which another module owns (the fused loss reads
    lm_head.weight without calling lm_head): DeepSpeed then gathers it for that forward and reduces its
    gradient. A no-op unless ZeRO-3 manages the parameter."""
    if is_zero3_param(param):
        import deepspeed  # only a ZeRO-3 run gets here (see the module docstring)

        deepspeed.zero.register_external_parameter(module, param)
