"""Run the real recipe (distthink.train.run) with dtype probes, under torchrun, for tests/train/test_bf16_zero.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dtype_worker.py OUT_JSON_PREFIX CONFIG [overrides...]

Probes (observing only; the recipe runs unchanged): the dtypes the fused LM-head loss receives, and at the first
micro-batch the dtypes of the module DeepSpeed prepared: trainable and frozen parameters, side modules (projector,
graph prefix), the CF table buffers, the loss sums. Each rank writes OUT_JSON_PREFIX.rank{R}.json; the exit code is
the recipe's."""

from __future__ import annotations

import json
import os
import sys

import distthink.engine.lm_loss as lm_loss
import distthink.train as train
from distthink.config import load_config
from distthink.engine import distributed as dist

RECORD: dict = {"head": [], "first": None}


def _dt(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _head_spy(real):
    def spy(hidden, weight, *args, **kwargs):
        RECORD["head"].append([_dt(hidden), _dt(weight)])
        return real(hidden, weight, *args, **kwargs)
    return spy


def _task_spy(make_task):
    def make(cfg):
        task = make_task(cfg)
        forward = task.forward

        def probed(wrapped, batch, attn_impl, dtype):
            out = forward(wrapped, batch, attn_impl, dtype)
            if RECORD["first"] is None:
                inner = getattr(wrapped, "module", wrapped)  # the DeepSpeed engine's module
                named = list(inner.named_parameters())
                side = [n for n, _ in named if n.startswith(("projector.", "prefix."))]
                RECORD["first"] = {
                    "trainable": sorted({_dt(p) for _, p in named if p.requires_grad}),
                    "frozen_base": sorted({_dt(p) for n, p in named if not p.requires_grad and "lora_" not in n}),
                    "adapters": sorted({_dt(p) for n, p in named if "lora_" in n}),
                    "side": sorted({_dt(p) for n, p in named if n in side}),
                    "cf_table": (_dt(inner.user_table) if getattr(inner, "user_table", None) is not None else None),
                    "sums": {k: _dt(v) for k, v in out.items()},
                }
            return out
        task.forward = probed
        return task
    return make


def main() -> int:
    prefix, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    lm_loss.fused_linear_cross_entropy = _head_spy(lm_loss.fused_linear_cross_entropy)
    train.make_task = _task_spy(train.make_task)
    code = train.run(load_config(config, overrides), ends_process=dist.launched_rank())
    with open(f"{prefix}.rank{os.environ.get('RANK', '0')}.json", "w") as fh:
        json.dump({"exit": code, **RECORD}, fh)
    return code


if __name__ == "__main__":
    exit_code = main()
    if dist.launched_rank():
        dist.leave(exit_code)
    sys.exit(exit_code)
