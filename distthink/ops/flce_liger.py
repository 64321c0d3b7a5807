"""GPU row kernel for `fused_linear_cross_entropy`, built on Liger-Kernel's Triton cross-entropy kernel.

The chunk orchestration (learned-row compaction, per-token scales, dynamic passes, grad_hidden and
fp32 grad_weight accumulation) is shared with the torch path in `flce.py`. Here only the per-row work
is replaced: `liger_cross_entropy_kernel` reads the (chunk, V) logits in their own dtype, computes the
loss and the argmax in fp32 (online softmax) and overwrites the logits in place with the *unscaled*
gradient softmax - onehot (reduction="sum" in the kernel's terms: no division by the token count).
The per-token weights are applied afterwards on the (chunk, H) side - grad_hidden = (G @ W) * w and
grad_weight += G.T @ (x * w) - so no extra (chunk, V) pass is needed for them.

Requires liger-kernel >= 0.8.2 (earlier versions compute a wrong backward for reduction="none" in
their own FLCE, and the kernel signature used here - with RETURN_PREDICTED_TOKENS and HAS_GRADIENTS -
is the one of 0.8.2 .. 0.8.5). The signature is checked against the kernel's declared arguments on
first use; a mismatch raises a clear error instead of a Triton failure deep inside.

NOT YET RUN ON A GPU in this repository's CI session; see docs/ops.md.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from importlib.metadata import PackageNotFoundError, version

import torch

from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.ops.flce_rows import RowResult, chunk_logits
from distthink.optional import has_liger

log = get_logger(__name__)

MIN_VERSION = (0, 8, 2)
# Liger uses 65536 // 2 as the largest block; larger blocks spill registers.
_MAX_FUSED_SIZE = 32768

_KERNEL_ARGS = (
    "X_ptr", "X_stride", "Y_ptr", "Y_stride", "weight_ptr", "loss_ptr", "z_loss_ptr", "loss_stride",
    "token_accuracy_ptr", "token_accuracy_stride", "predicted_tokens_ptr", "predicted_tokens_stride",
    "n_cols", "n_non_ignore", "sum_non_ignore_weight", "weight_sum", "ignore_index", "lse_square_scale",
    "label_smoothing", "reduction", "softcap", "RETURN_Z_LOSS", "RETURN_TOKEN_ACCURACY",
    "RETURN_PREDICTED_TOKENS", "BLOCK_SIZE", "HAS_WEIGHT", "HAS_SOFTCAPPING", "HAS_GRADIENTS",
)


def _version_tuple(text: str) -> tuple:
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """CUDA + triton + liger-kernel >= 0.8.2 (logs one line when the path is off)."""
    if not has_liger():
        return False
    return _version_ok()


def _version_ok() -> bool:
    try:
        found = version("liger-kernel")
    except PackageNotFoundError:
        return importlib.util.find_spec("liger_kernel") is not None  # a source checkout: trust it
    if _version_tuple(found) < MIN_VERSION:
        log.info("liger-kernel %s < 0.8.2: using the chunked torch path for fused linear cross-entropy", found)
        return False
    return True


def interpreter_available() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) with liger-kernel importable: lets the tests run the
    real Liger kernel on CPU tensors (slowly). Never selected by backend='auto'."""
    return (os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec("liger_kernel") is not None and _version_ok())


@functools.lru_cache(maxsize=None)
def _kernel():
    # lazy: liger-kernel is an optional GPU extra, and importing it imports triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    declared = getattr(liger_cross_entropy_kernel, "arg_names", None)
    if declared is not None and tuple(declared) != _KERNEL_ARGS:
        raise ConfigError("liger-kernel's liger_cross_entropy_kernel has an unexpected signature "
                          f"{tuple(declared)}. Fix: install a tested version (liger-kernel>=0.8.2,<=0.8.5) "
                          "or use backend='torch'.")
    return liger_cross_entropy_kernel


def check_kernel() -> None:
    """Import the kernel and check its signature (raises ConfigError / ImportError)."""
    _kernel()


def _next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def liger_row_kernel(x, weight, bias, target, ws, need_grad: bool, need_argmax: bool):
    """Chunk logits (logits dtype) -> CE (fp32), argmax, and in place the gradient softmax - onehot."""
    c = x.shape[0]
    logits = chunk_logits(x, weight, bias, ws.logits[:c])
    v = logits.shape[1]
    loss = torch.empty(c, dtype=torch.float32, device=x.device)
    predicted = torch.empty(c, dtype=torch.int64, device=x.device) if need_argmax else None
    target = target.contiguous()
    _kernel()[(c,)](
        X_ptr=logits, X_stride=logits.stride(-2),
        Y_ptr=target, Y_stride=target.stride(-1),
        weight_ptr=None,
        loss_ptr=loss, z_loss_ptr=None, loss_stride=loss.stride(-1),
        token_accuracy_ptr=None, token_accuracy_stride=0,
        predicted_tokens_ptr=predicted, predicted_tokens_stride=predicted.stride(-1) if need_argmax else 0,
        n_cols=v, n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0,
        # Only learned rows reach the kernel; an ignore_index that never occurs keeps it that way.
        ignore_index=-(2**31) + 1,
        lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None,
        RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=need_argmax,
        BLOCK_SIZE=min(_MAX_FUSED_SIZE, _next_power_of_2(v)),
        HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=need_grad,
        num_warps=32 if torch.version.hip is None else 16,
    )
    return RowResult(ce=loss, argmax=predicted, grad=logits if need_grad else None)


# torch.addmm(fp32 self, bf16/fp16 mat1, mat2, out_dtype=float32, out=fp32): the `out_dtype` overload exists from
# torch 2.8, but an fp32 `self` next to 16-bit operands is refused ("self and mat2 must have the same dtype") until
# pytorch/pytorch#167931 (merged November 2025, first released in 2.10; issue #154086). pyproject admits torch>=2.4
# and GPU clusters bring their own torch, so the fast path is gated on the version that accepts the call.
ADDMM_FP32_SELF_MIN_TORCH = (2, 10, 0)


def addmm_out_dtype_supported(torch_version: str, capability_major: int, hip: bool) -> bool:
    """Whether this torch build accepts the fp32-accumulating 16-bit addmm above (CUDA sm80+, not ROCm)."""
    return not hip and capability_major >= 8 and _version_tuple(torch_version) >= ADDMM_FP32_SELF_MIN_TORCH


@functools.lru_cache(maxsize=None)
def _addmm_out_dtype_ok(device_index: int) -> bool:
    return addmm_out_dtype_supported(torch.__version__, torch.cuda.get_device_capability(device_index)[0],
                                     torch.version.hip is not None)


def accumulate_weight_grad(grad_weight32: torch.Tensor, g: torch.Tensor, x_scaled32: torch.Tensor,
                           beta: float = 1.0) -> None:
    """grad_weight32 (fp32) = beta * grad_weight32 + g.T @ x_scaled (beta=0 ignores the old contents).

    g is the kernel's bf16/fp16 gradient: on sm80+ with torch >= 2.10 a 16-bit GEMM accumulates straight
    into the fp32 buffer (addmm out_dtype); otherwise the chunk is upcast (a (chunk, V) fp32 temporary)."""
    if g.dtype == torch.float32:
        torch.addmm(grad_weight32, g.t(), x_scaled32, beta=beta, out=grad_weight32)
        return
    if g.is_cuda and _addmm_out_dtype_ok(g.device.index or 0):
        torch.addmm(grad_weight32, g.t(), x_scaled32.to(g.dtype), beta=beta, out_dtype=torch.float32,
                    out=grad_weight32)
        return
    torch.addmm(grad_weight32, g.float().t(), x_scaled32, beta=beta, out=grad_weight32)
