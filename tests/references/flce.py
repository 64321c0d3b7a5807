"""Naive reference for `fused_linear_cross_entropy` (tests and benchmarks only).

It materialises the full (N, V) logits, uses `F.cross_entropy(reduction="none")`, multiplies by the
weights and lets autograd take the gradients. The dynamic `</think>` rule is written as a plain loop
over samples, independently of the vectorised version in `flce.py`, so that a test comparing the two
can fail. Never use this in training: it costs N*V memory several times over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_sample_ids(n: int, segment_ids=None, position_ids=None, row_length: int | None = None) -> list[int]:
    """One sample id per position, from the packing metadata, by a plain loop.

    A new sample starts at position 0, wherever `position_ids == 0`, wherever `segment_ids` changes,
    and (when `row_length` is given, for flattened (B, T) inputs) at the start of every row.
    """
    seg = segment_ids.reshape(-1).tolist() if segment_ids is not None else None
    pos = position_ids.reshape(-1).tolist() if position_ids is not None else None
    ids, current = [], -1
    for i in range(n):
        start = i == 0
        if row_length is not None and i % row_length == 0:
            start = True
        if pos is not None and pos[i] == 0:
            start = True
        if seg is not None and i > 0 and seg[i] != seg[i - 1]:
            start = True
        if start:
            current += 1
        ids.append(current)
    return ids


def reference_dynamic_multiplier(logits: torch.Tensor, target: torch.Tensor, static_weights: torch.Tensor,
                                 sample_ids: list[int], mode: str, think_end_id: int,
                                 ignore_index: int = -100) -> torch.Tensor:
    """The dynamic weight multiplier (N,), written directly from the rule.

    Within each sample, the learned region is the positions with target != ignore_index and static
    weight > 0, in order. If no position of the region has argmax == think_end_id, the multiplier is 1
    ("no `</think>` prediction": static weights are kept, in both modes). Otherwise:
      argmax: region positions up to and including the first such position get 0, the rest 1;
      soft:   softmax over the region positions of the `</think>` logit, then an inclusive cumsum.
    Detached: no gradient flows through it.
    """
    logits = logits.detach().float()
    n = logits.shape[0]
    mult = torch.ones(n, dtype=torch.float64)
    learned = [(int(target[i]) != ignore_index) and float(static_weights[i]) > 0 for i in range(n)]
    by_sample: dict[int, list[int]] = {}
    for i in range(n):
        if learned[i]:
            by_sample.setdefault(sample_ids[i], []).append(i)
    for positions in by_sample.values():
        predicted = [int(logits[i].argmax()) for i in positions]
        hits = [k for k, p in enumerate(predicted) if p == think_end_id]
        if not hits:
            continue
        if mode == "argmax":
            for k in range(hits[0] + 1):
                mult[positions[k]] = 0.0
        elif mode == "soft":
            z = torch.tensor([float(logits[i, think_end_id]) for i in positions], dtype=torch.float64)
            cdf = torch.cumsum(torch.softmax(z, 0), 0)
            for k, i in enumerate(positions):
                mult[i] = float(cdf[k])
        else:
            raise ValueError(mode)
    return mult.to(torch.float32)


def naive_fused_linear_cross_entropy(hidden, weight, target, bias=None, token_weights=None, ignore_index=-100,
                                     normalizer=None, dynamic=None, think_end_id=None, segment_ids=None,
                                     position_ids=None, reduction="sum", upcast=False):
    """Materialise logits and compute sum_i w_i * m_i * CE_i / normalizer with autograd.

    hidden (N, H) or (B, T, H); weight (V, H); target (N,) or (B, T). `upcast=True` computes the logits
    in fp32 from the (possibly bf16) inputs: the "truth" for bf16 tolerance tests.
    Returns the loss (0-d, or (N,) for reduction="none") and the dynamic multiplier (N,).
    """
    row_length = None
    if hidden.dim() == 3:
        row_length = hidden.shape[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1)
    n = hidden.shape[0]
    h, w = (hidden.float(), weight.float()) if upcast else (hidden, weight)
    logits = h @ w.t()
    if bias is not None:
        logits = logits + (bias.float() if upcast else bias)
    ce = F.cross_entropy(logits.float() if upcast else logits, target, ignore_index=ignore_index,
                         reduction="none").float()
    static = (token_weights.reshape(-1).float() if token_weights is not None
              else torch.ones(n, device=hidden.device))
    static = torch.where(target != ignore_index, static, torch.zeros_like(static))
    mult = torch.ones(n)
    if dynamic is not None:
        ids = reference_sample_ids(n, segment_ids, position_ids, row_length)
        mult = reference_dynamic_multiplier(logits, target, static, ids, dynamic, think_end_id, ignore_index)
    per_token = ce * static * mult.to(ce.device)
    if normalizer is not None:
        per_token = per_token / (normalizer if not torch.is_tensor(normalizer) else normalizer.float())
    loss = per_token if reduction == "none" else per_token.sum()
    return loss, mult
