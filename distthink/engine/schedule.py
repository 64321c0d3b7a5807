"""The learning-rate schedule: linear warm-up, then cosine, linear or constant (train.scheduler)."""

from __future__ import annotations

import math
from typing import Callable

from distthink.config import Config


def lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """Multiplier of train.lr at each optimizer step (for torch.optim.lr_scheduler.LambdaLR)."""
    warm, kind = cfg.train.warmup_steps, cfg.train.scheduler

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f
