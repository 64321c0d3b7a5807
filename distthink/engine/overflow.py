"""How an optimizer step ends: applied, skipped as a NaN/Inf step, or skipped as an fp16 loss-scale overflow.

fp16 training scales the loss (accelerate's torch.amp.GradScaler without DeepSpeed, DeepSpeed's dynamic loss
scaler with it). The scale search starts high (2^16) and halves on every step whose gradients overflow, so the
first steps of an fp16 run are *expected* to have a finite loss and infinite gradients. Such a step is skipped by
the scaler itself and is not a NaN step: counting it toward `train.nan_max_consecutive` would stop a healthy run
with exit 3 while the scaler is still searching. Once the scale is down to 1, scaling no longer explains infinite
gradients, and the step counts as non-finite like any other.

Without DeepSpeed the GradScaler also needs its bookkeeping finished on every step: `clip_grad_norm_` unscales
the gradients (GradScaler.unscale_), and only `GradScaler.update()` resets that state. A step that skipped the
optimizer without `update()` made the next step's `unscale_()` raise "unscale_() has already been called on this
optimizer since the last update()". `finish_step` always leaves the scaler updated.
"""

from __future__ import annotations

import math

STEP = "step"            # finite loss and gradients: the update is applied
EMPTY = "empty"          # no learned token on any rank: nothing to learn, no update (not an error)
OVERFLOW = "overflow"    # fp16 loss-scale overflow: the scaler skips the update and lowers the scale
NON_FINITE = "non_finite"  # a NaN/Inf loss, or infinite gradients that loss scaling does not explain

LOSS_SCALE_FLOOR = 1.0  # below this, lowering the scale cannot be what makes gradients finite


def classify_step(weight_total: float, loss_finite: bool, grad_norm: float, loss_scale: float | None) -> str:
    """The kind of this step (module constants). `loss_finite`: on every rank; `grad_norm`: the global norm;
    `loss_scale`: the fp16 loss scale in use (None without fp16 loss scaling)."""
    if weight_total <= 0:
        return EMPTY
    if loss_finite and math.isfinite(grad_norm):
        return STEP
    if loss_finite and loss_scale is not None and loss_scale > LOSS_SCALE_FLOOR:
        return OVERFLOW
    return NON_FINITE


def finish_step(kind: str, optimizer, scaler=None, *, deepspeed: bool = False) -> None:
    """Apply or skip the optimizer step of a step of `kind`.

    DeepSpeed has already stepped (or skipped an overflow) inside its boundary backward: nothing to do. Without it,
    `optimizer` is accelerate's optimizer, whose step() runs GradScaler.step (which skips the update by itself when
    unscale_ found infinite gradients) and GradScaler.update (which lowers the scale). A step that must not update
    still calls `scaler.update()`, so the next step's unscale_ starts from a clean state."""
    if deepspeed:
        return
    if kind in (STEP, OVERFLOW):
        optimizer.step()
    elif scaler is not None:
        scaler.update()


def loss_scale_of(scaler=None, ds_optimizer=None) -> float | None:
    """The fp16 loss scale in use: accelerate's GradScaler, or DeepSpeed's fp16 optimizer (None without either)."""
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    if ds_optimizer is not None:
        scale = getattr(ds_optimizer, "loss_scale", None)
        if scale is None:
            scale = getattr(ds_optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None
    return None
