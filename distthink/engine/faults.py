"""Fault injection for tests: environment variables that make a run fail on purpose at a chosen point.

They exist so that the recovery paths (kill -9 of a rank, NaN/Inf guard, a crash mid-save) are exercised by
real multi-process runs, not mocks. Unset, each hook is a no-op.

- DISTTHINK_FAULT_KILL_AT_STEP=S:R      rank R SIGKILLs itself before step S;
- DISTTHINK_FAULT_NAN_STEPS=2,3         the loss of those steps is NaN;
- DISTTHINK_FAULT_INF_GRAD_STEPS=3      the loss of those steps stays finite but every gradient is infinite
                                        (the case DeepSpeed sees only inside its own step);
- DISTTHINK_FAULT_SAVE_SLEEP_AT=S:SEC   rank 0 sleeps SEC seconds inside the save of step S, after every rank
                                        wrote its state and before the checkpoint is made complete;
- DISTTHINK_FAULT_KILL_DURING_ENCODE=N  the process writing a data cache entry SIGKILLs itself after writing its
                                        N-th chunk of encoded samples (before the entry is complete).
- DISTTHINK_FAULT_SP_LEAK=KIND          a sequence-parallel run is wrong on purpose, for the tests that show the
                                        equality tests can fail: `normaliser` keeps each shard's normaliser at the
                                        whole row's (W counts a token N times), `think_state` does not pass the
                                        `</think>` state across shards, `scale` divides by world instead of DP.
- DISTTHINK_FAULT_RESHARD_LEAK=KIND     a resume on another data layout is wrong on purpose: `per_rank_position`
                                        keeps each rank's saved position in the new layout's plan instead of
                                        continuing at the global sample position (repeats and skips samples).
"""

from __future__ import annotations

import os
import signal
import time

import torch

from distthink.logging_utils import get_logger

log = get_logger(__name__)


def _steps(env_var: str) -> set[int]:
    spec = os.environ.get(env_var, "")
    return {int(x) for x in spec.split(",")} if spec else set()


def kill_before_step(step: int, rank: int) -> None:
    spec = os.environ.get("DISTTHINK_FAULT_KILL_AT_STEP")
    if spec:
        s, r = (int(x) for x in spec.split(":"))
        if s == step and r == rank:
            log.warning("DISTTHINK_FAULT_KILL_AT_STEP: rank %d kills itself (-9) before step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)


def nan_loss(step: int) -> bool:
    return step in _steps("DISTTHINK_FAULT_NAN_STEPS")


def inf_gradients(step: int) -> bool:
    return step in _steps("DISTTHINK_FAULT_INF_GRAD_STEPS")


def sleep_inside_save(step: int, name: str) -> None:
    spec = os.environ.get("DISTTHINK_FAULT_SAVE_SLEEP_AT", "")
    if spec and int(spec.split(":")[0]) == step:
        log.info("DISTTHINK_FAULT_SAVE_SLEEP_AT: sleeping %ss inside the save of %s", spec.split(":")[1], name)
        time.sleep(float(spec.split(":")[1]))


def sp_leak(kind: str) -> bool:
    """DISTTHINK_FAULT_SP_LEAK: leave out one piece of sequence parallelism's exactness (tests only)."""
    return os.environ.get("DISTTHINK_FAULT_SP_LEAK", "") == kind


def kill_during_encode(chunks_written: int) -> None:
    spec = os.environ.get("DISTTHINK_FAULT_KILL_DURING_ENCODE")
    if spec and int(spec) == chunks_written:
        log.warning("DISTTHINK_FAULT_KILL_DURING_ENCODE: the cache writer kills itself (-9) after %d chunks",
                    chunks_written)
        os.kill(os.getpid(), signal.SIGKILL)


def reshard_leak(kind: str) -> bool:
    """DISTTHINK_FAULT_RESHARD_LEAK: resume the data plan the wrong way after a topology change (tests only)."""
    return os.environ.get("DISTTHINK_FAULT_RESHARD_LEAK", "") == kind


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward (the DISTTHINK_FAULT_INF_GRAD_STEPS hook)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
