"""Fused linear cross-entropy with per-token and dynamic ("after `</think>`") weights.

    loss = sum_i  w_i * m_i * CE(hidden_i @ weight.T + bias, target_i) / normalizer

w_i are the static token weights, m_i the (detached) dynamic multiplier. The (N, V) logits are never
materialised: rows are processed in chunks and, as in Liger-Kernel's FLCE, the backward is computed
inside the forward chunk by chunk (grad_hidden stored (N, H), grad_weight/grad_bias accumulated in
fp32); `backward` only multiplies by grad_output. Peak extra memory is O(chunk * V + N * H) plus the
(V, H) gradient that any implementation returns.

Only the *learned* rows (target != ignore_index and static weight > 0) are ever multiplied with the
vocabulary: prompt and padding rows cost nothing, and their gradient is exactly 0.

Dynamic modes need, per sample, whether and where the model's argmax is `</think>`. Row i's weight
then depends on *later* rows of its sample, so the op runs in (at most) two passes:

  pass 1  every learned row: logits GEMM, CE, argmax. A row whose multiplier is already decided
          (its sample's first `</think>` hit is known, or its sample ended) is back-propagated at once;
          a row whose multiplier is 0 costs only the logits GEMM. A row of a sample that continues past
          the chunk with no hit so far is *pending*.
  pass 2  only pending rows whose final weight is non-zero are recomputed (3 GEMMs). In argmax mode
          that is rows of samples that never predict `</think>` and that straddle a chunk border; in
          soft mode every pending row. Chunk borders are moved onto sample borders when one lies in
          the second half of a chunk, so that few samples straddle.

The soft mode needs the `</think>` logit of every row of a sample before the first row can be
weighted; it is a cheap (N, H) x (H,) product computed up front (no vocabulary pass).

reduction="none" returns per-token losses; its backward recomputes the logits chunk by chunk with the
actual per-token grad_output (a precomputed grad_weight cannot be rescaled per token).

All of the above is the default strategy="rows". strategy="vocab" (torch backend, opt-in) tiles the
vocabulary instead: see `_Job.vocab_pass_a` / `vocab_pass_b` and docs/ops.md.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from distthink.data.types import IGNORE_INDEX
from distthink.errors import ConfigError, DataError, DistthinkError
from distthink.logging_utils import get_logger
from distthink.ops import flce_liger
from distthink.ops.flce_rows import RowResult, Workspace, torch_row_kernel
from distthink.zero3 import gathered

log = get_logger(__name__)

# Transient-logits budget for the automatic chunk size (MiB). Override with DISTTHINK_FLCE_CHUNK_MB or
# the chunk_size argument.
DEFAULT_CHUNK_BUDGET_MB = 1024
# At most this fraction of the learned rows per chunk, so the transient (chunk, V) buffer stays about
# 0.1x of what the naive implementation holds at its peak (measured: ~1.25 (N, V) fp32 tensors).
_MAX_CHUNK_FRACTION = 0.125
# Below this many rows a GEMM wastes the machine; never chunk smaller unless the budget forces it.
_MIN_CHUNK_ROWS = 64
# In dynamic pass 1, gather the rows that need a backward when fewer than this fraction do.
_COMPACT_BELOW = 0.9

_logged_backends: set[tuple[str, str]] = set()


@dataclass
class FLCEStats:
    """Side outputs of `fused_linear_cross_entropy(..., return_stats=True)` (all detached except
    `selected_logits`).

    num_learned:   learned tokens (target != ignore_index and static weight > 0), python int.
    num_correct:   learned tokens whose argmax prediction equals the target (0-d tensor).
    accuracy:      num_correct / max(num_learned, 1) (0-d float tensor).
    weight_sum:    sum of the effective weights w_i * m_i, *before* dividing by the normalizer.
    selected_logits: (len(stats_rows), len(stats_token_ids)) fp32 logits, differentiable w.r.t.
                   hidden, weight and bias; None unless both stats_rows and stats_token_ids are given.
    num_samples:   samples with at least one learned token (dynamic modes only, else None).
    num_think_end_samples: samples whose argmax predicts `</think>` somewhere in the learned region.
    num_masked:    learned tokens whose dynamic multiplier is exactly 0 (argmax mode).
    num_recomputed: rows recomputed in the dynamic second pass (cost indicator).
    backend, strategy, chunk_size: what ran (chunk_size = rows per chunk, or columns per vocab tile).
    """

    num_learned: int
    num_correct: torch.Tensor
    accuracy: torch.Tensor
    weight_sum: torch.Tensor
    selected_logits: Optional[torch.Tensor] = None
    num_samples: Optional[int] = None
    num_think_end_samples: Optional[torch.Tensor] = None
    num_masked: Optional[torch.Tensor] = None
    num_recomputed: int = 0
    backend: str = "torch"
    chunk_size: int = 0
    strategy: str = "rows"


def _compact_rows_(buffers: Sequence[torch.Tensor], sel: torch.Tensor, block: int = 64) -> None:
    """Move rows sel[i] -> i in place (sel strictly increasing, so sel[i] >= i).

    Blocks are copied in increasing order through a (block, V) temporary; a block's destinations are
    all below the sources of every later block, so nothing is overwritten before it is read.
    """
    k = sel.numel()
    for b in buffers:
        for i0 in range(0, k, block):
            src = sel[i0:i0 + block]
            b[i0:i0 + src.numel()] = b.index_select(0, src)


# ----------------------------------------------------------------------------------------------------
# The chunked engine shared by both backends.
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    rows: torch.Tensor                    # (M,) learned row indices into N, increasing
    all_rows: bool                        # rows == arange(N): slice instead of gather
    target: torch.Tensor                  # (M,) long
    scale: torch.Tensor                   # (M,) fp32 static weight / normalizer
    static: torch.Tensor                  # (M,) fp32 static weight
    normalizer: float
    chunk: int
    row_kernel: Callable
    accumulate_weight_grad: Callable
    need_argmax: bool
    reduction: str
    dynamic: Optional[str] = None
    think_end_id: Optional[int] = None
    sample: Optional[torch.Tensor] = None     # (M,) dense sample index per learned row, nondecreasing
    sample_end: Optional[torch.Tensor] = None  # (S,) last learned row of each sample
    sample_starts: Optional[list] = None       # python list of first learned row of each sample
    soft: Optional[torch.Tensor] = None        # (M,) soft multiplier for samples that hit </think>
    strategy: str = "rows"                     # "rows" (chunks of rows) | "vocab" (tiles of the vocabulary)
    grad_enabled: bool = True                  # torch.is_grad_enabled() at the call
    tile: int = 0                              # vocabulary columns per tile (vocab strategy)

    # ---- helpers -----------------------------------------------------------------------------------
    def chunk_ranges(self, m: int, starts: Optional[list]) -> list[tuple[int, int]]:
        ranges, a = [], 0
        while a < m:
            b = min(a + self.chunk, m)
            if starts is not None and b < m:
                i = bisect.bisect_right(starts, b) - 1
                if i >= 0 and a + self.chunk // 2 <= starts[i] < b:
                    b = starts[i]             # end the chunk on a sample border: fewer pending rows
            ranges.append((a, b))
            a = b
        return ranges

    def hidden_rows(self, hidden: torch.Tensor, idx: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return hidden[a:b] if self.all_rows else hidden.index_select(0, idx)

    def multiplier(self, first_hit: torch.Tensor, j0: int, j1: int, known_upto: int):
        """Dynamic multiplier of learned rows [j0, j1) knowing the argmax of rows < known_upto.

        Returns (m, resolved): m is final wherever resolved is True."""
        m_rows = self.target.numel()
        sid = self.sample[j0:j1]
        fh = first_hit[sid]
        has_hit = fh < m_rows
        resolved = has_hit | (self.sample_end[sid] < known_upto)
        if self.dynamic == "argmax":
            j = torch.arange(j0, j1, device=sid.device)
            m = torch.where(has_hit & (j <= fh), 0.0, 1.0)
        else:
            m = torch.where(has_hit, self.soft[j0:j1], torch.ones_like(self.soft[j0:j1]))
        return m.float(), resolved

    # ---- gradient of one chunk ---------------------------------------------------------------------
    def backprop_chunk(self, res: RowResult, coef: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
                       contiguous_from: Optional[int], weight, grads, ws: Workspace, may_skip: bool):
        """Add coef_r * (softmax_r - onehot_r) to the gradients of the rows of one chunk."""
        grad_hidden, grad_weight32, grad_bias32 = grads
        g = res.grad
        if may_skip:
            keep = coef != 0
            k = int(keep.sum())
            if k == 0:
                return
            if k < _COMPACT_BELOW * coef.numel():
                sel = keep.nonzero().squeeze(1)
                _compact_rows_([g], sel)
                g, coef, x, idx = g[:k], coef[sel], x.index_select(0, sel), idx[sel]
                contiguous_from = None
        if grad_hidden is not None:
            g_lowp = g
            if g.dtype != weight.dtype:       # torch path in bf16: GEMM with W in its own dtype
                g_lowp = ws.logits[:g.shape[0]]
                g_lowp.copy_(g)
            part = torch.mm(g_lowp, weight).float().mul_(coef[:, None])
            if contiguous_from is not None:
                grad_hidden[contiguous_from:contiguous_from + part.shape[0]] = part
            else:
                grad_hidden.index_copy_(0, idx, part.to(grad_hidden.dtype))
        if grad_weight32 is not None:
            self.accumulate_weight_grad(grad_weight32.buf, g, x.float() * coef[:, None], grad_weight32.beta())
        if grad_bias32 is not None:
            if g.dtype == torch.float32:
                grad_bias32.add_(torch.mv(g.t(), coef))
            else:
                grad_bias32.add_(torch.mv(g.t(), coef.to(g.dtype)).float())

    # ---- passes ------------------------------------------------------------------------------------
    def run(self, hidden, weight, bias, grads, with_grad: bool, ws: Workspace):
        """Pass 1 (+ pass 2 in dynamic modes). Returns per-row CE, effective scale, counters."""
        m_rows = self.target.numel()
        ce = torch.empty(m_rows, dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        dynamic = self.dynamic is not None
        first_hit = pending = None
        if dynamic:
            n_samples = self.sample_end.numel()
            first_hit = torch.full((n_samples,), m_rows, dtype=torch.long, device=hidden.device)
            pending = torch.zeros(m_rows, dtype=torch.bool, device=hidden.device)
        positions = torch.arange(m_rows, device=hidden.device) if dynamic else None
        for a, b in self.chunk_ranges(m_rows, self.sample_starts if dynamic else None):
            idx = self.rows[a:b]
            x = self.hidden_rows(hidden, idx, a, b)
            t = self.target[a:b]
            res = self.row_kernel(x, weight, bias, t, ws, need_grad=with_grad, need_argmax=self.need_argmax)
            ce[a:b] = res.ce
            if res.argmax is not None:
                correct += (res.argmax == t).sum()
            coef = self.scale[a:b]
            if dynamic:
                hit = res.argmax == self.think_end_id
                first_hit.scatter_reduce_(0, self.sample[a:b][hit], positions[a:b][hit], reduce="amin")
                mult, resolved = self.multiplier(first_hit, a, b, known_upto=b)
                pending[a:b] = ~resolved
                coef = coef * mult * resolved
            if with_grad:
                self.backprop_chunk(res, coef, x, idx, a if self.all_rows else None, weight, grads, ws,
                                    may_skip=dynamic)
            del res
        eff = self.scale
        recomputed = 0
        if dynamic:
            mult, _ = self.multiplier(first_hit, 0, m_rows, known_upto=m_rows)
            eff = self.scale * mult
            if with_grad:
                redo = (pending & (eff != 0)).nonzero().squeeze(1)
                recomputed = int(redo.numel())
                if recomputed:
                    self.backprop_rows(hidden, weight, bias, redo, eff, grads, ws)
            self.last_mult, self.last_first_hit = mult, first_hit
        return ce, eff, correct, recomputed

    def backprop_rows(self, hidden, weight, bias, which: torch.Tensor, coef_all: torch.Tensor, grads, ws):
        """Recompute logits for learned rows `which` (indices into M) and add coef * grad."""
        for a in range(0, which.numel(), self.chunk):
            j = which[a:a + self.chunk]
            idx = self.rows.index_select(0, j)
            x = hidden.index_select(0, idx)
            res = self.row_kernel(x, weight, bias, self.target.index_select(0, j), ws,
                                  need_grad=True, need_argmax=False)
            self.backprop_chunk(res, coef_all.index_select(0, j), x, idx, None, weight, grads, ws,
                                may_skip=False)
            del res


    # ---- vocabulary-tiled strategy (opt-in: strategy="vocab") ------------------------------------------
    # Pass A streams the vocabulary once in tiles of all learned rows, with an online logsumexp/argmax;
    # every dynamic weight is then known. Pass B recomputes each tile for the rows with a non-zero weight,
    # writes grad_weight[tile] directly (no read-modify-write accumulator) and accumulates the small
    # grad_hidden. 4 GEMMs instead of 3, but each (V, H) matrix is streamed ~twice in total instead of
    # ~4 times per row chunk: the better trade on memory-bandwidth-bound CPUs.

    def _tile_logits(self, x, weight, bias, v0, v1, lowp_buf, fp32_buf):
        rows = x.shape[0]
        out = lowp_buf[:rows, :v1 - v0] if lowp_buf is not None else fp32_buf[:rows, :v1 - v0]
        if bias is not None:
            torch.addmm(bias[v0:v1], x, weight[v0:v1].t(), out=out)
        else:
            torch.matmul(x, weight[v0:v1].t(), out=out)
        if lowp_buf is None:
            return out
        work = fp32_buf[:rows, :v1 - v0]
        work.copy_(out)
        return work

    def _tile_buffers(self, rows, weight):
        lowp = weight.dtype != torch.float32
        width = min(self.tile, weight.shape[0])
        lowp_buf = torch.empty(rows, width, dtype=weight.dtype, device=weight.device) if lowp else None
        return lowp_buf, torch.empty(rows, width, dtype=torch.float32, device=weight.device)

    def vocab_pass_a(self, hidden, weight, bias):
        """Per learned row: CE, argmax (first maximal index, like torch.argmax) and lse, one vocabulary pass."""
        m_rows, v = self.target.numel(), weight.shape[0]
        dev = hidden.device
        x = hidden if self.all_rows else hidden.index_select(0, self.rows)
        run_max = torch.full((m_rows,), -math.inf, device=dev)
        run_sum = torch.zeros(m_rows, device=dev)
        target_logit = torch.zeros(m_rows, device=dev)
        argmax = torch.zeros(m_rows, dtype=torch.long, device=dev)
        lowp_buf, fp32_buf = self._tile_buffers(m_rows, weight)
        t = self.target
        for v0 in range(0, v, self.tile):
            v1 = min(v0 + self.tile, v)
            logits = self._tile_logits(x, weight, bias, v0, v1, lowp_buf, fp32_buf)
            inside = (t >= v0) & (t < v1)
            picked = logits.gather(1, (t - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1)
            target_logit = torch.where(inside, picked, target_logit)
            tile_max, tile_arg = torch.max(logits, dim=1)
            argmax = torch.where(tile_max > run_max, tile_arg + v0, argmax)
            new_max = torch.maximum(run_max, tile_max)
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(dim=1))
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        return lse - target_logit, argmax, lse

    def vocab_pass_b(self, hidden, weight, bias, lse, coef, need_h, need_w, need_b):
        """Gradients for coef_r * CE_r (coef per learned row); returns (grad_hidden, grad_weight, grad_bias)."""
        dev = hidden.device
        v = weight.shape[0]
        keep = (coef != 0).nonzero().squeeze(1)
        k = keep.numel()
        gh = torch.zeros_like(hidden) if need_h else None
        gw = (torch.empty_like(weight) if k else torch.zeros_like(weight)) if need_w else None
        gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
        if k == 0:
            return gh, gw, (gb.to(bias.dtype) if gb is not None else None)
        rows = self.rows.index_select(0, keep)
        x = hidden.index_select(0, rows)
        c = coef.index_select(0, keep)
        t = self.target.index_select(0, keep)
        lse_k = lse.index_select(0, keep)
        xc32 = x.float() * c[:, None]
        gh_acc = torch.zeros(k, hidden.shape[1], dtype=torch.float32, device=dev) if need_h else None
        lowp_buf, fp32_buf = self._tile_buffers(k, weight)
        rows_k = torch.arange(k, device=dev)
        for v0 in range(0, v, self.tile):
            v1 = min(v0 + self.tile, v)
            p = self._tile_logits(x, weight, bias, v0, v1, lowp_buf, fp32_buf)
            p.sub_(lse_k[:, None]).exp_()                      # softmax, this tile
            inside = ((t >= v0) & (t < v1)).nonzero().squeeze(1)
            if inside.numel():
                p.index_put_((rows_k[inside], t[inside] - v0), torch.full((inside.numel(),), -1.0, device=dev),
                             accumulate=True)
            if need_h:
                if lowp_buf is not None:
                    g_lowp = lowp_buf[:k, :v1 - v0]
                    g_lowp.copy_(p)
                    gh_acc.add_(torch.mm(g_lowp, weight[v0:v1]))
                else:
                    gh_acc.addmm_(p, weight[v0:v1])
            if need_w:
                if gw.dtype == torch.float32:
                    torch.mm(p.t(), xc32, out=gw[v0:v1])
                else:
                    gw[v0:v1] = torch.mm(p.t(), xc32)
            if need_b:
                gb[v0:v1] = torch.mv(p.t(), c)
        if need_h:
            gh.index_copy_(0, rows, gh_acc.mul_(c[:, None]).to(gh.dtype))
        return gh, gw, (gb.to(bias.dtype) if gb is not None else None)


def _accumulate_weight_grad_default(grad_weight32: torch.Tensor, g: torch.Tensor, x_scaled32: torch.Tensor,
                                   beta: float = 1.0):
    """grad_weight32 = beta * grad_weight32 + g.T @ x_scaled in fp32 (g fp32: exact; else upcast chunk)."""
    if g.dtype != torch.float32:
        g = g.float()
    torch.addmm(grad_weight32, g.t(), x_scaled32, beta=beta, out=grad_weight32)


class _Accumulator:
    """fp32 gradient accumulator without the zero fill: the first chunk writes with beta=0 (which ignores
    the uninitialised memory, NaN included). Skipping the fill saves a full (V, H) pass per step."""

    def __init__(self, shape, device):
        self.buf = torch.empty(shape, dtype=torch.float32, device=device)
        self.started = False

    def beta(self) -> float:
        first = not self.started
        self.started = True
        return 0.0 if first else 1.0

    def result(self, dtype) -> torch.Tensor:
        if not self.started:
            self.buf.zero_()
        return self.buf.to(dtype)


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------

def _autocast_off(device_type: str):
    """Autocast switched off on `device_type` (a no-op context on a device type without autocast)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Autocast is switched off inside: the GEMMs run in the inputs' own dtype (with fp32 accumulation
    where it matters), whatever autocast context the trainer is in. The caller decides that dtype: under
    autocast, distthink.engine.lm_loss.LMHeadLoss casts hidden and weight to the autocast dtype first."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, job: _Job):
        with _autocast_off(hidden.device.type):
            return _FusedLinearCrossEntropy._forward(ctx, hidden, weight, bias, job)

    @staticmethod
    def backward(ctx, grad_loss, _g_correct, _g_wsum):
        with _autocast_off(grad_loss.device.type):
            return _FusedLinearCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, job: _Job):
        # needs_input_grad is True under torch.no_grad() too; skip all gradient work there (eval)
        need_h, need_w, need_b = (bool(n and job.grad_enabled) for n in ctx.needs_input_grad[:3])
        any_grad = need_h or need_w or need_b
        fused = any_grad and job.reduction == "sum"
        n, v = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        if job.strategy == "vocab":
            return _FusedLinearCrossEntropy._forward_vocab(ctx, hidden, weight, bias, job, fused, any_grad)
        ws = Workspace(min(job.chunk, max(job.target.numel(), 1)), v, weight.dtype, dev,
                       need_fp32=job.row_kernel is torch_row_kernel)
        grads = (None, None, None)
        if fused:
            grads = (torch.zeros_like(hidden) if need_h else None,
                     _Accumulator(weight.shape, dev) if need_w else None,
                     torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None)
        ce, eff, correct, recomputed = job.run(hidden, weight, bias, grads, fused, ws)
        del ws
        per_row = ce * eff
        if job.reduction == "none":
            loss = torch.zeros(n, dtype=torch.float32, device=dev)
            loss.index_copy_(0, job.rows, per_row)
        else:
            loss = per_row.sum()
        job.recomputed = recomputed
        ctx.job = job
        ctx.fused = fused
        if fused:
            gh, gw32, gb32 = grads
            ctx.grads = [gh, None if gw32 is None else gw32.result(weight.dtype),
                         None if gb32 is None else gb32.to(bias.dtype)]
        elif any_grad:
            ctx.save_for_backward(hidden, weight, bias)
            ctx.eff = eff
        weight_sum = (eff * job.normalizer).sum() if eff.numel() else torch.zeros((), device=dev)
        ctx.mark_non_differentiable(correct, weight_sum)
        return loss, correct, weight_sum

    @staticmethod
    def _forward_vocab(ctx, hidden, weight, bias, job: _Job, fused: bool, any_grad: bool):
        ce, argmax, lse = job.vocab_pass_a(hidden, weight, bias)
        m_rows = job.target.numel()
        correct = (argmax == job.target).sum()
        eff = job.scale
        if job.dynamic is not None:
            first_hit = torch.full((job.sample_end.numel(),), m_rows, dtype=torch.long, device=hidden.device)
            hit = argmax == job.think_end_id
            first_hit.scatter_reduce_(0, job.sample[hit], hit.nonzero().squeeze(1), reduce="amin")
            mult, _ = job.multiplier(first_hit, 0, m_rows, known_upto=m_rows)
            eff = job.scale * mult
            job.last_mult, job.last_first_hit = mult, first_hit
        job.recomputed = 0
        per_row = ce * eff
        if job.reduction == "none":
            loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            loss.index_copy_(0, job.rows, per_row)
        else:
            loss = per_row.sum()
        ctx.job, ctx.fused = job, fused
        need = [bool(n and job.grad_enabled) for n in ctx.needs_input_grad[:3]]
        if fused:
            ctx.grads = list(job.vocab_pass_b(hidden, weight, bias, lse, eff, *need))
        elif any_grad:
            ctx.save_for_backward(hidden, weight, bias)
            ctx.eff, ctx.lse = eff, lse
        weight_sum = (eff * job.normalizer).sum()
        ctx.mark_non_differentiable(correct, weight_sum)
        return loss, correct, weight_sum

    @staticmethod
    def _backward(ctx, grad_loss):
        if not ctx.fused and ctx.job.strategy == "vocab":
            hidden, weight, bias = ctx.saved_tensors
            coef = grad_loss.index_select(0, ctx.job.rows).float() * ctx.eff
            gh, gw, gb = ctx.job.vocab_pass_b(hidden, weight, bias, ctx.lse, coef, *ctx.needs_input_grad[:3])
            return gh, gw, gb, None
        if ctx.fused:
            if ctx.grads is None:
                raise DistthinkError("fused_linear_cross_entropy: backward ran twice on the same graph; its "
                                     "gradients are computed once in forward. Fix: call the op again instead of "
                                     "backward(retain_graph=True) twice.")
            gh, gw, gb = ctx.grads
            ctx.grads = None
            scale = float(grad_loss)
            if scale != 1.0:
                for g in (gh, gw, gb):
                    if g is not None:
                        g.mul_(scale)
            return gh, gw, gb, None
        # reduction="none": recompute with the actual per-token grad_output.
        hidden, weight, bias = ctx.saved_tensors
        job = ctx.job
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dev = hidden.device
        grads = (torch.zeros_like(hidden) if need_h else None,
                 _Accumulator(weight.shape, dev) if need_w else None,
                 torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None)
        coef = grad_loss.index_select(0, job.rows).float() * ctx.eff
        which = (coef != 0).nonzero().squeeze(1)
        if which.numel():
            ws = Workspace(min(job.chunk, which.numel()), weight.shape[0], weight.dtype, dev,
                           need_fp32=job.row_kernel is torch_row_kernel)
            job.backprop_rows(hidden, weight, bias, which, coef, grads, ws)
        gh, gw32, gb32 = grads
        return (gh, None if gw32 is None else gw32.result(weight.dtype),
                None if gb32 is None else gb32.to(bias.dtype), None)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------

def auto_chunk_size(rows: int, vocab: int, dtype: torch.dtype, backend: str = "torch",
                    budget_mb: Optional[float] = None) -> int:
    """Default chunk: the largest number of rows whose transient (chunk, V) buffers fit the budget
    (DISTTHINK_FLCE_CHUNK_MB, default 1024 MiB), at most an eighth of the learned rows (so peak extra
    memory stays well under 0.15x the naive N*V tensors) but not below 64 rows; chunks are balanced.

    Bytes per row: torch path V*4 (fp32 work) [+ V*2 for the bf16/fp16 logits]; liger path V*itemsize
    (its kernel works in place on the logits)."""
    if rows <= 0:
        return 1
    if budget_mb is None:
        budget_mb = float(os.environ.get("DISTTHINK_FLCE_CHUNK_MB", DEFAULT_CHUNK_BUDGET_MB))
    item = torch.empty((), dtype=dtype).element_size()
    per_row = vocab * (item if backend == "liger" else 4 + (item if dtype != torch.float32 else 0))
    by_budget = max(1, int(budget_mb * 2**20) // per_row)
    chunk = min(rows, by_budget, max(_MIN_CHUNK_ROWS, math.ceil(rows * _MAX_CHUNK_FRACTION)))
    n_chunks = math.ceil(rows / chunk)
    return math.ceil(rows / n_chunks)


def auto_tile_width(rows: int, vocab: int, dtype: torch.dtype, budget_mb: Optional[float] = None) -> int:
    """Vocabulary columns per tile for the "vocab" strategy: the (rows, tile) fp32 work (+ low-precision
    logits) fits the budget (DISTTHINK_FLCE_CHUNK_MB, default 1024 MiB), at most 1/8 of the vocabulary
    (same memory bound as the row chunks), at least 256 columns; balanced."""
    if budget_mb is None:
        budget_mb = float(os.environ.get("DISTTHINK_FLCE_CHUNK_MB", DEFAULT_CHUNK_BUDGET_MB))
    item = torch.empty((), dtype=dtype).element_size()
    per_col = max(rows, 1) * (4 + (item if dtype != torch.float32 else 0))
    width = min(vocab, max(1, int(budget_mb * 2**20) // per_col),
                max(256, math.ceil(vocab * _MAX_CHUNK_FRACTION)))
    n_tiles = math.ceil(vocab / width)
    return math.ceil(vocab / n_tiles)


def _resolve_backend(backend: str, hidden: torch.Tensor):
    if backend not in ("auto", "torch", "liger"):
        raise ConfigError(f"fused_linear_cross_entropy: unknown backend {backend!r}. "
                          "Fix: use 'auto', 'torch' or 'liger'.")
    if backend == "auto":
        backend = "liger" if hidden.is_cuda and flce_liger.available() else "torch"
        if backend == "liger":
            try:
                flce_liger.check_kernel()
            except (ConfigError, ImportError) as err:   # an untested liger-kernel: say so, run torch
                if ("liger-broken", "") not in _logged_backends:
                    _logged_backends.add(("liger-broken", ""))
                    log.warning("fused_linear_cross_entropy: liger path unusable (%s); using the torch path", err)
                backend = "torch"
    elif backend == "liger":
        if not hidden.is_cuda:
            # tests may run the real Liger kernel through Triton's CPU interpreter (TRITON_INTERPRET=1)
            if not flce_liger.interpreter_available():
                raise ConfigError("fused_linear_cross_entropy: backend='liger' needs CUDA tensors. "
                                  "Fix: use backend='auto' or 'torch' on CPU.")
        elif not flce_liger.available():
            raise ConfigError("fused_linear_cross_entropy: backend='liger' needs liger-kernel>=0.8.2 and triton. "
                              "Fix: pip install 'distthink[gpu]', or use backend='torch'.")
    key = (backend, hidden.device.type)
    if key not in _logged_backends:
        _logged_backends.add(key)
        log.info("fused_linear_cross_entropy: %s backend on %s",
                 "Liger-Kernel Triton" if backend == "liger" else "chunked torch", hidden.device.type)
    if backend == "liger":
        return backend, flce_liger.liger_row_kernel, flce_liger.accumulate_weight_grad
    return backend, torch_row_kernel, _accumulate_weight_grad_default


def _as_flat(name: str, t, n: int, shape3: Optional[tuple]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not torch.is_tensor(t):
        raise ConfigError(f"fused_linear_cross_entropy: {name} must be a tensor, got {type(t).__name__}.")
    expected = shape3 if shape3 is not None else (n,)
    if tuple(t.shape) != tuple(expected) and t.numel() != n:
        raise ConfigError(f"fused_linear_cross_entropy: {name} has shape {tuple(t.shape)}, expected "
                          f"{tuple(expected)}. Fix: pass one value per position of hidden.")
    return t.reshape(-1)


def _sample_starts(n: int, device, segment_ids, position_ids, row_length: Optional[int]) -> torch.Tensor:
    start = torch.zeros(n, dtype=torch.bool, device=device)
    start[0] = True
    if row_length is not None:
        start[::row_length] = True
    if position_ids is not None:
        start |= position_ids.to(device) == 0
    if segment_ids is not None:
        seg = segment_ids.to(device)
        start[1:] |= seg[1:] != seg[:-1]
    return start


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    normalizer=None,
    dynamic: Optional[str] = None,
    think_end_id: Optional[int] = None,
    segment_ids: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    reduction: str = "sum",
    return_stats: bool = False,
    stats_token_ids: Optional[Sequence[int]] = None,
    stats_rows=None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    strategy: str = "auto",
):
    """Weighted cross-entropy of `hidden @ weight.T + bias` without materialising the logits.

    Args:
        hidden: (N, H) or (B, T, H) final hidden states (the trainer's `model.model(...)` output).
        weight: (V, H) lm_head weight (the embedding matrix when tied); same dtype as hidden.
        target: (N,) or (B, T) long, the *shifted* targets (batch contract `targets`); ignore_index = skip.
        bias: optional (V,).
        token_weights: optional (N,)/(B, T) float static weights (batch contract `target_weights`);
            must be finite and >= 0. None = 1 for every non-ignored target.
        normalizer: float or 0-d tensor the weighted sum is divided by (the trainer passes the global
            weight total across ranks and accumulation steps; nothing is all-reduced here). None = 1.
            Treated as a constant (no gradient).
        dynamic: None | "argmax" | "soft" (see module docstring and docs/ops.md); needs think_end_id and
            segment_ids or position_ids (sample starts = where position_ids == 0 / segment_ids change;
            for (B, T) inputs every row also starts a sample).
        reduction: "sum" -> 0-d fp32 loss; "none" -> (N,) fp32 per-token weighted losses (0 where not
            learned), correct for any per-token grad_output.
        return_stats: also return an `FLCEStats`. `stats_token_ids` (K ids) and `stats_rows` (R indices
            into the flattened N) give `selected_logits` (R, K) in fp32, differentiable (a tiny exact
            separate product hidden[rows] @ weight[ids].T: no second vocabulary pass).
        chunk_size: rows per chunk ("rows" strategy) or vocabulary columns per tile ("vocab" strategy);
            None = automatic (`auto_chunk_size` / `auto_tile_width`).
        backend: "auto" (liger on CUDA when liger-kernel>=0.8.2 is installed, else torch), "torch", "liger".
        strategy: "auto" (= "rows") | "rows" | "vocab". "rows" chunks the learned rows (3 GEMMs; both
            backends); "vocab" tiles the vocabulary in two passes (4 GEMMs but each (V, H) matrix streamed
            ~twice in total instead of ~4 times per row chunk; torch backend only), an option for
            memory-bandwidth-starved CPUs.

    Returns:
        loss, or (loss, FLCEStats) when return_stats.
    """
    if reduction not in ("sum", "none"):
        raise ConfigError(f"fused_linear_cross_entropy: reduction={reduction!r}. Fix: use 'sum' or 'none' "
                          "(normalise with `normalizer`).")
    shape3 = None
    row_length = None
    if hidden.dim() == 3:
        shape3 = tuple(hidden.shape[:2])
        row_length = hidden.shape[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ConfigError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                          f"{tuple(weight.shape)} do not match. Fix: hidden (N, H) or (B, T, H), weight (V, H).")
    if hidden.dtype != weight.dtype:
        raise ConfigError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}. "
                          "Fix: cast the hidden states to the lm_head dtype.")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ConfigError(f"fused_linear_cross_entropy: bias {tuple(bias.shape)} {bias.dtype} does not match "
                          f"weight {tuple(weight.shape)} {weight.dtype}.")
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    hidden = hidden.contiguous()
    target = _as_flat("target", target, n, shape3).to(dev)
    token_weights = _as_flat("token_weights", token_weights, n, shape3)
    segment_ids = _as_flat("segment_ids", segment_ids, n, shape3)
    position_ids = _as_flat("position_ids", position_ids, n, shape3)
    if target.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"fused_linear_cross_entropy: target must be integer, got {target.dtype}.")
    target = target.long()

    if normalizer is None:
        norm = 1.0
    else:
        norm = float(normalizer.detach()) if torch.is_tensor(normalizer) else float(normalizer)
        if not math.isfinite(norm) or norm <= 0:
            raise ConfigError(f"fused_linear_cross_entropy: normalizer={norm} must be a finite number > 0. "
                              "Fix: pass the (global) total of the token weights, or None for a plain sum.")

    if dynamic not in (None, "argmax", "soft"):
        raise ConfigError(f"fused_linear_cross_entropy: dynamic={dynamic!r}. Fix: None, 'argmax' or 'soft'.")
    if dynamic is not None:
        if think_end_id is None or not (0 <= int(think_end_id) < v):
            raise ConfigError(f"fused_linear_cross_entropy: dynamic={dynamic!r} needs think_end_id in [0, {v}), "
                              f"got {think_end_id!r}. Fix: pass tokenizer.convert_tokens_to_ids('</think>').")
        if segment_ids is None and position_ids is None:
            raise ConfigError("fused_linear_cross_entropy: dynamic weights need segment_ids or position_ids to know "
                              "where each packed sample starts. Fix: pass the batch's segment_ids/position_ids.")

    # ---- learned rows ------------------------------------------------------------------------------
    learned = target != ignore_index
    if token_weights is not None:
        token_weights = token_weights.to(device=dev, dtype=torch.float32)
        bad = ~torch.isfinite(token_weights) | (token_weights < 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DataError(f"token weight {float(token_weights[i])} at flattened position {i} is negative or not "
                            "finite", field="target_weights", fix="weights must be finite and >= 0")
        learned &= token_weights > 0
    rows = learned.nonzero().squeeze(1)
    m = rows.numel()
    tgt = target.index_select(0, rows)
    if m and bool(((tgt < 0) | (tgt >= v)).any()):
        i = int(rows[((tgt < 0) | (tgt >= v)).nonzero()[0]])
        raise DataError(f"target id {int(target[i])} at flattened position {i} is outside the vocabulary [0, {v})",
                        field="targets", fix="check the tokenizer/model pairing or use ignore_index for masked positions")
    static = (token_weights.index_select(0, rows) if token_weights is not None
              else torch.ones(m, dtype=torch.float32, device=dev))

    backend_name, row_kernel, acc_w = _resolve_backend(backend, hidden)
    if strategy not in ("auto", "rows", "vocab"):
        raise ConfigError(f"fused_linear_cross_entropy: strategy={strategy!r}. Fix: 'auto', 'rows' or 'vocab'.")
    if strategy == "vocab" and backend_name != "torch":
        raise ConfigError("fused_linear_cross_entropy: strategy='vocab' runs on the torch backend only. "
                          "Fix: backend='torch', or strategy='rows'/'auto'.")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ConfigError(f"fused_linear_cross_entropy: chunk_size={chunk_size} must be >= 1.")
    chunk = int(chunk_size) if chunk_size else auto_chunk_size(m, v, weight.dtype, backend_name)
    if strategy == "auto":
        # Measured on a shared 2-core CPU, rows and vocab tie (within noise) at N=512, V=151,936; rows does
        # 3 GEMMs instead of 4, so it is the default everywhere. vocab is for bandwidth-starved CPUs.
        strategy = "rows"
    tile = 0
    if strategy == "vocab":
        tile = int(chunk_size) if chunk_size else auto_tile_width(m, v, weight.dtype)
        chunk = max(m, 1)

    job = _Job(rows=rows, all_rows=(m == n), target=tgt, scale=static / norm, static=static, normalizer=norm,
               chunk=chunk, row_kernel=row_kernel, accumulate_weight_grad=acc_w,
               need_argmax=bool(return_stats or dynamic), reduction=reduction, strategy=strategy, tile=tile,
               grad_enabled=torch.is_grad_enabled())

    if dynamic is not None and m:
        starts = _sample_starts(n, dev, segment_ids, position_ids, row_length)
        sample_of_pos = torch.cumsum(starts.long(), 0) - 1
        _, dense, counts = torch.unique_consecutive(sample_of_pos.index_select(0, rows), return_inverse=True,
                                                    return_counts=True)
        ends = torch.cumsum(counts, 0) - 1
        first = ends - counts + 1
        job.dynamic, job.think_end_id = dynamic, int(think_end_id)
        job.sample, job.sample_end, job.sample_starts = dense, ends, first.tolist()
        if dynamic == "soft":
            job.soft = _soft_multiplier(hidden, weight, bias, rows, dense, first, int(think_end_id), chunk)

    if m == 0:
        # Nothing is learned: an exact zero that still belongs to the graph (zero gradients).
        zero = (hidden[:1].sum() * 0.0 + weight[:1, :1].sum() * 0.0).float()
        loss = zero.expand(n).clone() if reduction == "none" else zero
        correct = torch.zeros((), dtype=torch.long, device=dev)
        weight_sum = torch.zeros((), device=dev)
    else:
        loss, correct, weight_sum = _FusedLinearCrossEntropy.apply(hidden, weight, bias, job)
    if shape3 is not None and reduction == "none":
        loss = loss.view(shape3)
    if not return_stats:
        return loss

    stats = FLCEStats(num_learned=m, num_correct=correct, accuracy=correct.float() / max(m, 1),
                      weight_sum=weight_sum, backend=backend_name, chunk_size=tile or chunk, strategy=strategy,
                      num_recomputed=getattr(job, "recomputed", 0))
    if dynamic is not None and m:
        mult, first_hit = job.last_mult, job.last_first_hit
        stats.num_samples = int(job.sample_end.numel())
        stats.num_think_end_samples = (first_hit < m).sum()
        stats.num_masked = (mult == 0).sum()
    if stats_token_ids is not None and stats_rows is not None:
        stats.selected_logits = selected_logits(hidden, weight, bias, stats_rows, stats_token_ids)
    return loss, stats


def selected_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows, token_ids):
    """fp32 logits of `token_ids` (K) at `rows` (R indices into flattened hidden): (R, K), differentiable.

    This is the ThinkRec "Yes"-logit read: an exact (R, H) x (H, K) product, no vocabulary pass."""
    if hidden.dim() == 3:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = torch.as_tensor(rows, dtype=torch.long, device=hidden.device).reshape(-1)
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=hidden.device).reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= hidden.shape[0]):
        raise ConfigError(f"stats_rows must index the {hidden.shape[0]} flattened positions.")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ConfigError(f"stats_token_ids must be vocabulary ids in [0, {weight.shape[0]}).")
    out = hidden.index_select(0, rows).float() @ weight.index_select(0, ids).float().t()
    if bias is not None:
        out = out + bias.index_select(0, ids).float()
    return out


@torch.no_grad()
def _soft_multiplier(hidden, weight, bias, rows, sample, first, think_end_id: int, chunk: int) -> torch.Tensor:
    """Inclusive cumsum, within each sample's learned rows, of the softmax of the `</think>` logit.

    The logit is hidden[row] . weight[think_end_id] (+ bias): an (M, H) x (H,) product, chunked."""
    w_think = weight[think_end_id].float()
    z = torch.empty(rows.numel(), dtype=torch.float64, device=hidden.device)
    for a in range(0, rows.numel(), max(chunk, 1024)):
        z[a:a + max(chunk, 1024)] = hidden.index_select(0, rows[a:a + max(chunk, 1024)]).float() @ w_think
    if bias is not None:
        z += float(bias[think_end_id])
    n_samples = first.numel()
    zmax = torch.full((n_samples,), -math.inf, dtype=torch.float64, device=z.device)
    zmax.scatter_reduce_(0, sample, z, reduce="amax")
    e = torch.exp(z - zmax[sample])
    total = torch.zeros(n_samples, dtype=torch.float64, device=z.device).index_add_(0, sample, e)
    p = e / total[sample]
    cs = torch.cumsum(p, 0)
    base = cs[first] - p[first]              # cumsum before each sample's first row
    return (cs - base[sample]).clamp_(0.0, 1.0).float()


@contextlib.contextmanager
def gathered_lm_head(weight: torch.nn.Parameter, modifier_rank=None):
    """Make a ZeRO-3-partitioned lm_head weight whole for the duration of the block (no-op otherwise).

    Use it around the op when the weight is read outside the module that owns it:

        with gathered_lm_head(model.lm_head.weight):
            loss = fused_linear_cross_entropy(h, model.lm_head.weight, ...)

    With reduction="sum" the backward does not read the weight (its gradient is computed in forward), so
    gathering for the forward is enough. reduction="none" recomputes in backward and then needs the
    weight whole during backward too: under ZeRO-3 prefer reduction="sum".
    """
    with gathered([weight], modifier_rank=modifier_rank):
        yield weight
