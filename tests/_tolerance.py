"""Floating-point tolerances derived from the dtype and the magnitudes involved, not from one machine.

Model: every float operation rounds with relative error <= u = eps/2 (eps = ``torch.finfo(dtype).eps``). A sum or
dot product of k terms then has error <= k*u*sum|terms| in the worst case; rounding errors behave like
independent zero-mean noise, so the realistic scale is sqrt(k)*u*sum|terms| (the probabilistic bound of Higham &
Mary, SIAM J. Sci. Comput. 2019). The summation order (SIMD width, MKL/oneDNN blocking, thread count, fused vs
unfused kernels) changes the individual roundings but not this scale, so a bound of this form holds on any CPU,
while a real bug (a wrong mask, a missing weight, a shifted target) moves the result by O(the values).

    fp_tol(dtype, magnitude, k=k, factor=f) = f * eps(dtype) * sqrt(k) * magnitude

magnitude: the scale of the summed terms (sum|a_i*b_i| <= ||a||*||b||, or ||x||_inf of the result where nothing
cancels); k: the reduction length (or the number of chained rounding steps); factor: the safety margin. The
default 8 covers the random-walk tail (~3 sigma), the difference of two independently rounded results (x2) and a
few elementwise ops.

Set DISTTHINK_TOL_SCALE=0.1 to check that every bound built here still holds at a tenth of its size on your
machine (the margin this suite is written for); it never needs to be > 1.
"""

from __future__ import annotations

import math
import os

import torch

# One forward of the tiny test decoders (2 layers, width 64, MLP 128: distthink.tiny and the tests' own configs):
# per layer 2 RMSNorms and 6 chained reductions (qkv, scores, probs @ V, o, gate/up, down), then the final norm
# and the LM head: 18 chained reductions of length <= 128, i.e. ~18 * 128 rounded terms on any output's path.
# Rows of T > 128 tokens make the attention sums longer: use 18 * T.
TINY_DECODER_K = 18 * 128


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon of `dtype` (float32: 1.19e-7, bfloat16: 7.8e-3, float64: 2.2e-16)."""
    return torch.finfo(dtype).eps


def fp_tol(dtype: torch.dtype, magnitude: float, *, k: int = 1, factor: float = 8.0) -> float:
    """factor * eps(dtype) * sqrt(k) * magnitude: see the module docstring."""
    scale = float(os.environ.get("DISTTHINK_TOL_SCALE", "1"))
    return scale * factor * eps(dtype) * math.sqrt(k) * float(magnitude)


def run_metric_tol(value: float, tokens: int) -> float:
    """Tolerance for a logged float32 training metric (loss, per-objective loss, grad norm) of two runs that see
    the same data but reduce in another order (ranks x micro-batch x GA, DDP vs ZeRO, all-reduce order): each is a
    float32 sum over the step's `tokens` tokens (CE terms, per-parameter gradient sums), so the two differ by
    ~sqrt(tokens)*eps relative; the factor 16 (2 x the default) also covers the weights drifting apart by that much
    per step over the few steps compared. ~3e-5 relative for 250 tokens; a wrong normalisation (a per-micro-batch
    mean, tried on test_train_normalisation) moves the first step's grad norm by 4e-3 relative, ~150x this bound."""
    return fp_tol(torch.float32, abs(value), k=tokens, factor=16.0)
