"""fp16 loss scaling and the NaN/Inf guard (distthink/engine/overflow.py), with the real pieces the trainer uses on a
GPU without DeepSpeed: torch.amp.GradScaler (it runs on CPU tensors too) inside accelerate's AcceleratedOptimizer.

The trainer's sequence per step: scaled backward, `clip_grad_norm_` (which unscales: GradScaler.unscale_),
classify the step, finish it. The leaky variant is the code before the fix: a non-finite step skipped
`optimizer.step()`, so GradScaler.update() never ran and the next step's unscale_ raised."""

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from distthink.engine import overflow
from distthink.engine.faults import InfGradient


def test_classification():
    c = overflow.classify_step
    assert c(0.0, True, 1.0, None) == overflow.EMPTY
    assert c(5.0, True, 1.0, None) == c(5.0, True, 1.0, 2.0 ** 16) == overflow.STEP
    assert c(5.0, True, math.inf, 2.0 ** 16) == overflow.OVERFLOW  # fp16: the scale search, not a NaN step
    assert c(5.0, True, math.nan, 2.0) == overflow.OVERFLOW
    assert c(5.0, True, math.inf, 1.0) == overflow.NON_FINITE  # at the floor, scaling explains nothing
    assert c(5.0, True, math.inf, None) == overflow.NON_FINITE  # bf16/fp32: no loss scaling
    assert c(5.0, False, math.inf, 2.0 ** 16) == overflow.NON_FINITE  # a NaN loss is a NaN step whatever the scale


@pytest.fixture
def scaled():
    Accelerator(cpu=True)  # AcceleratedOptimizer reads accelerate's state
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), device_placement=False, scaler=scaler)
    return model, scaler, opt


def _step(model, scaler, opt, fault: str | None, *, leaky: bool = False, weight_total: float = 1.0) -> str:
    """One trainer step (distthink/train.py, non-DeepSpeed branch)."""
    loss = model(torch.ones(3, 4)).square().sum()
    if fault == "inf_grad":
        loss = InfGradient.apply(loss)  # finite loss, infinite gradients: what an fp16 overflow looks like
    if fault == "nan_loss":
        loss = loss * float("nan")
    scaler.scale(loss).backward()
    scaler.unscale_(opt.optimizer)  # accelerator.clip_grad_norm_ -> unscale_gradients
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    kind = overflow.classify_step(weight_total, math.isfinite(float(loss)), grad_norm,
                                  overflow.loss_scale_of(scaler))
    if leaky:  # before the fix: only a finite step reached optimizer.step()
        if kind == overflow.STEP:
            opt.step()
    else:
        overflow.finish_step(kind, opt, scaler)
    opt.zero_grad(set_to_none=True)
    return kind


def test_overflow_skips_the_update_lowers_the_scale_and_training_goes_on(scaled):
    model, scaler, opt = scaled
    before = [p.detach().clone() for p in model.parameters()]
    assert _step(model, scaler, opt, "inf_grad") == overflow.OVERFLOW
    assert scaler.get_scale() == 2.0 ** 15  # halved by GradScaler.update
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no update
    assert _step(model, scaler, opt, None) == overflow.STEP  # the next unscale_ works
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("fault, weight_total", [("nan_loss", 1.0), (None, 0.0)])
def test_skipped_steps_still_finish_the_scalers_bookkeeping(scaled, fault, weight_total):
    model, scaler, opt = scaled
    before = [p.detach().clone() for p in model.parameters()]
    kind = _step(model, scaler, opt, fault, weight_total=weight_total)
    assert kind == (overflow.NON_FINITE if fault else overflow.EMPTY)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert _step(model, scaler, opt, None) == overflow.STEP


def test_leaky_variant_breaks_the_next_step(scaled):
    model, scaler, opt = scaled
    _step(model, scaler, opt, "inf_grad", leaky=True)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        _step(model, scaler, opt, None, leaky=True)


def test_loss_scale_of_reads_both_scalers():
    assert overflow.loss_scale_of() is None
    assert overflow.loss_scale_of(torch.amp.GradScaler("cpu", init_scale=8.0)) == 8.0
    assert overflow.loss_scale_of(torch.amp.GradScaler("cpu", enabled=False)) is None
    ds_opt = type("DeepSpeedZeroOptimizer", (), {"loss_scale": 1024.0})()  # the attribute DeepSpeed's fp16 opts have
    assert overflow.loss_scale_of(ds_optimizer=ds_opt) == 1024.0
