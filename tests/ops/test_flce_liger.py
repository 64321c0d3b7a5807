"""The Liger-Kernel GPU path of `fused_linear_cross_entropy` against the torch path and the naive reference.

- GPU tests (marker `gpu`) run the Triton kernel on CUDA; skipped without CUDA + liger-kernel>=0.8.2.
- Without a GPU, if triton and liger-kernel are importable, the same checks run the *real* Liger kernel
  through Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess because the variable must be set
  before triton is imported). Skipped when they are not installed (the default CPU environment).
"""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _tolerance import fp_tol
from references.flce import naive_fused_linear_cross_entropy
from test_flce import close, grads_of, make

from distthink.ops import fused_linear_cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))

# fp32 (TF32 off by default for matmul in torch; kernel math in fp32): the longest reduction is over the 2048-word
# vocabulary. bf16: liger's kernel, only runnable on a GPU with liger-kernel, keeps the bounds measured there:
# ~eps_bf16/4 for the loss, ~4 eps_bf16 of the largest element for the gradients (see test_flce's BF16_* bounds).
FP32_RTOL = fp_tol(torch.float32, 1.0, k=2048)
BF16_RTOL_LOSS, BF16_RTOL_GRAD = 2e-3, 3e-2

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
# CI installs triton + liger-kernel with `pip install --target DIR --no-deps` and names DIR here, so that the
# interpreter check runs without putting triton into the main environment (where other libraries would
# start importing it on CPU).
TRITON_SITE = os.environ.get("DISTTHINK_TRITON_SITE", "")
HAVE_LIGER_SITE = bool(TRITON_SITE) and all(
    importlib.machinery.PathFinder.find_spec(name, [TRITON_SITE]) is not None for name in ("triton", "liger_kernel"))


def _liger_case(device, dtype, dynamic=None, reduction="sum", bias=False):
    """Compare liger vs torch backends vs naive (fp32 upcast truth); returns max relative errors."""
    torch.manual_seed(0)
    hidden, weight, b, target, g = make(n=67, h=64, v=2048, bias=bias, dtype=dtype)
    hidden = hidden.detach().to(device).requires_grad_()
    weight = weight.detach().to(device).requires_grad_()
    b = b.detach().to(device).requires_grad_() if b is not None else None
    target = target.to(device)
    target[3:9] = -100
    w = (torch.rand(67, generator=g) + 0.5).to(device)
    kw = dict(token_weights=w, normalizer=13.0, reduction=reduction)
    if dynamic:
        with torch.no_grad():  # make </think> (id 5) the argmax at a few positions
            weight[5] = hidden[[10, 30, 50]].mean(0) * 4
        kw.update(dynamic=dynamic, think_end_id=5, position_ids=(torch.arange(67, device=device) % 25))
    go = torch.randn(67, device=device) if reduction == "none" else None
    out = {}
    for backend in ("liger", "torch"):
        loss, stats = fused_linear_cross_entropy(hidden, weight, target, bias=b, chunk_size=16, backend=backend,
                                                 return_stats=True, **kw)
        assert stats.backend == backend
        out[backend] = (loss, *grads_of(loss, (hidden, weight, b), go), stats.num_correct, stats.weight_sum)
    ref, _ = naive_fused_linear_cross_entropy(hidden, weight, target, bias=b, upcast=True, **kw)
    out["ref"] = (ref, *grads_of(ref, (hidden, weight, b), go))
    # same argmax-based statistics from both backends
    assert int(out["liger"][-2]) == int(out["torch"][-2])
    close(out["liger"][-1], out["torch"][-1], fp_tol(torch.float32, 1.0, k=67))  # two fp32 sums of 67 weights > 0
    return out


def _check(out, rtol_loss, rtol_grad):
    for backend in ("liger", "torch"):
        close(out[backend][0], out["ref"][0], rtol_loss)
        for a, b in zip(out[backend][1:-2], out["ref"][1:]):
            close(a.float(), b.float(), rtol_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAVE_LIGER), reason="needs CUDA and liger-kernel>=0.8.2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dynamic", [None, "argmax", "soft"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_liger_gpu_matches_torch_and_naive(dtype, dynamic, reduction):
    out = _liger_case("cuda", dtype, dynamic, reduction, bias=dtype == torch.float32)
    if dtype == torch.float32:
        _check(out, FP32_RTOL, FP32_RTOL)
    else:
        _check(out, BF16_RTOL_LOSS, BF16_RTOL_GRAD)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAVE_LIGER), reason="needs CUDA and liger-kernel>=0.8.2")
def test_auto_backend_is_liger_on_gpu():
    hidden, weight, _, target, _ = make(n=8)
    _, stats = fused_linear_cross_entropy(hidden.cuda(), weight.cuda(), target.cuda(), return_stats=True)
    assert stats.backend == "liger"


@pytest.mark.skipif(CUDA or not (HAVE_LIGER or HAVE_LIGER_SITE),
                    reason="CPU-only check; needs triton + liger-kernel importable or DISTTHINK_TRITON_SITE")
def test_liger_kernel_through_triton_interpreter():
    script = textwrap.dedent("""
        import sys
        if %r:
            sys.path.insert(0, %r)
        import torch
        sys.path[:0] = [%r, %r]
        from test_flce_liger import _liger_case, _check, FP32_RTOL, BF16_RTOL_LOSS, BF16_RTOL_GRAD
        for dynamic in (None, "argmax", "soft"):
            for reduction in ("sum", "none"):
                _check(_liger_case("cpu", torch.float32, dynamic, reduction, bias=dynamic is None), FP32_RTOL,
                       FP32_RTOL)
        _check(_liger_case("cpu", torch.bfloat16), BF16_RTOL_LOSS, BF16_RTOL_GRAD)
        print("OK")
    """ % (HAVE_LIGER_SITE, TRITON_SITE, HERE, os.path.dirname(HERE)))  # this module's folder, and tests/ (helpers)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]


@pytest.mark.parametrize("version, major, hip, ok", [
    ("2.8.0+cu128", 9, False, False), ("2.9.1+cu128", 9, False, False),  # the overload exists, fp32 self refused
    ("2.10.0+cu128", 9, False, True), ("2.11.0+cu130", 8, False, True), ("2.13.0", 9, False, True),
    ("2.11.0+cu130", 7, False, False),  # Volta/Turing: no bf16 tensor cores
    ("2.11.0+rocm6.4", 9, True, False)])
def test_fp32_accumulating_addmm_is_gated_on_the_torch_that_accepts_it(monkeypatch, version, major, hip, ok):
    """torch.addmm(fp32 self, 16-bit mat1/mat2, out_dtype=float32) is refused by torch 2.8 and 2.9 ("self and mat2
    must have the same dtype", pytorch/pytorch#154086) and accepted from 2.10 (#167931)."""
    from distthink.ops import flce_liger

    assert flce_liger.addmm_out_dtype_supported(version, major, hip) is ok
    # the device-cached gate reads this torch's version string and the GPU's capability
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.version, "hip", "6.4" if hip else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, 0))
    flce_liger._addmm_out_dtype_ok.cache_clear()
    try:
        assert flce_liger._addmm_out_dtype_ok(0) is ok
    finally:
        flce_liger._addmm_out_dtype_ok.cache_clear()
