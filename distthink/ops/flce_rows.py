"""The per-chunk row kernel of the fused loss on the torch path, and what every row kernel shares.

One chunk of rows: logits (into a reused workspace) -> cross-entropy, argmax and, when asked, the gradient
softmax - onehot in place. distthink.ops.flce runs the chunk loop; distthink.ops.flce_liger is the Triton row
kernel with the same contract (`RowResult`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RowResult:
    ce: torch.Tensor                      # (c,) fp32 unweighted cross-entropy
    argmax: Optional[torch.Tensor]        # (c,) int64 or None
    grad: Optional[torch.Tensor]          # (c, V) softmax - onehot (unscaled), fp32 or logits dtype


class Workspace:
    """Reused (chunk, V) buffers: reusing them avoids page-faulting a fresh buffer per chunk on CPU."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, need_fp32: bool):
        self.logits = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.fp32 = (torch.empty(rows, vocab, dtype=torch.float32, device=device)
                     if need_fp32 and dtype != torch.float32 else None)


def chunk_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 out: torch.Tensor) -> torch.Tensor:
    """x @ weight.T (+ bias) written into the workspace slice `out` (no new (chunk, V) allocation)."""
    if bias is not None:
        return torch.addmm(bias, x, weight.t(), out=out)
    # matmul(out=) writes in place; mm(out=) with a transposed operand goes through a temporary of the
    # output's size on CPU (measured: +1 chunk of memory)
    return torch.matmul(x, weight.t(), out=out)


def torch_row_kernel(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                     ws: Workspace, need_grad: bool, need_argmax: bool) -> RowResult:
    """Chunk logits -> CE/argmax and, if asked, the fp32 gradient (softmax - onehot) in place."""
    c = x.shape[0]
    logits = chunk_logits(x, weight, bias, ws.logits[:c])
    work = logits
    if ws.fp32 is not None:               # low precision: softmax etc. in fp32
        work = ws.fp32[:c]
        work.copy_(logits)
    target_logit = work.gather(1, target[:, None]).squeeze(1)
    row_max, argmax = torch.max(work, dim=1)
    if work.is_cuda:                      # in-place softmax through plain ops (no aliasing question)
        work.sub_(row_max[:, None]).exp_()
        sum_exp = work.sum(dim=1)
        work.div_(sum_exp[:, None])
        lse = row_max + torch.log(sum_exp)
    else:                                 # fused CPU softmax, written in place
        torch.softmax(work, 1, out=work)
        # p(argmax) = exp(max - lse) >= 1/V never underflows, so lse = max - log p(argmax) is exact.
        lse = row_max - torch.log(work.gather(1, argmax[:, None]).squeeze(1))
    ce = lse - target_logit
    grad = None
    if need_grad:
        flat = work.view(-1)
        flat_index = torch.arange(c, device=work.device) * work.shape[1] + target
        flat.index_put_((flat_index,), torch.full((c,), -1.0, device=work.device), accumulate=True)
        grad = work
    return RowResult(ce=ce, argmax=argmax if need_argmax else None, grad=grad)
