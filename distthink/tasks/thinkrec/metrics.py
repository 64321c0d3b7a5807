"""Recommendation metrics, exact on one rank and across ranks.

Definitions (binary labels y in {0, 1}, real scores s; higher score = more recommended):

- **AUC**: P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg) over all (positive, negative) pairs, computed
  via the Mann-Whitney statistic with *average ranks for ties*:
  ``AUC = (sum of positive ranks - P(P+1)/2) / (P * N)``. Undefined (NaN) with one class.
- **UAUC**: the mean of per-user AUCs over users that have both classes. Users with one class are
  skipped and counted (``uauc_skipped_users``); the mean is unweighted (every user counts once).
- **Ranking metrics @k**, per user over that user's scored candidates, then averaged over users with
  at least one positive (users without a positive are skipped and counted):
  - HR@k = 1 if any positive is among the top k, else 0.
  - NDCG@k = DCG@k / IDCG@k, DCG@k = sum_{i=1..k} y_(i) / log2(i + 1) where y_(i) is the label at
    rank i; IDCG@k is the DCG of the ideal order (min(P, k) positives first).
  - MAP@k = mean of AP@k, AP@k = (1 / min(P, k)) * sum_{i=1..k} y_(i) * precision@i.
  Ties in score are broken *pessimistically* (negatives before positives at equal score). This is
  deterministic and independent of the order samples arrive in, which the cross-rank exactness
  needs, and it gives a constant scorer no credit.

Distributed exactness: `gather_predictions` all-gathers (sample_index, user, label, score) from every
rank of a torch.distributed group, drops the duplicates that DistributedSampler pads with, and
checks that exactly the split's samples are present; `compute_metrics` then runs on the full arrays,
so the result equals the single-rank result exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from distthink.errors import DistthinkError


def _average_ranks(values: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based average ranks of `values` within each group (ties share the mean rank).

    Returns (ranks, order): ranks aligned with the input; order = the (group, value) sort order.
    """
    n = len(values)
    g = np.zeros(n, dtype=np.int64) if groups is None else groups
    order = np.lexsort((values, g))
    v, gs = values[order], g[order]
    pos = np.arange(n)
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
    new_tie = new_group | np.r_[True, v[1:] != v[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_first = pos[new_tie]
    tie_last = np.r_[tie_first[1:], n] - 1
    # average of 1-based ranks first..last within the group
    avg = 0.5 * (tie_first + tie_last)[tie_id] + 1.0 - group_start
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg
    return ranks, order


def _check(labels, scores, users=None):
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise DistthinkError(f"labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise DistthinkError("labels must be 0 or 1; binarise ratings first (distthink rec prepare --threshold)")
    if np.isnan(s).any():
        raise DistthinkError(f"{int(np.isnan(s).sum())} scores are NaN; the model produced invalid outputs")
    if users is not None:
        u = np.asarray(users)
        if u.shape != y.shape:
            raise DistthinkError(f"user ids must align with labels, got {u.shape} vs {y.shape}")
        return y.astype(np.int64), s, u
    return y.astype(np.int64), s


def auc(labels, scores) -> float:
    """Tie-aware ROC AUC (NaN if only one class). labels (n,) in {0,1}; scores (n,)."""
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks, _ = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_user_auc(users, labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUC of every user, vectorised. Returns (user_ids, aucs) with NaN for single-class users."""
    y, s, u = _check(labels, scores, users)
    uniq, inv = np.unique(u, return_inverse=True)
    ranks, _ = _average_ranks(s, inv)
    n_pos = np.bincount(inv, weights=y, minlength=len(uniq))
    n_all = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(inv, weights=ranks * y, minlength=len(uniq))
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = (rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    aucs[(n_pos == 0) | (n_neg == 0)] = np.nan
    return uniq, aucs


def uauc(users, labels, scores) -> tuple[float, int, int]:
    """Mean per-user AUC over users with both classes. Returns (uauc, users_used, users_skipped)."""
    _, aucs = per_user_auc(users, labels, scores)
    ok = ~np.isnan(aucs)
    value = float(aucs[ok].mean()) if ok.any() else float("nan")
    return value, int(ok.sum()), int((~ok).sum())


def ranking_metrics(users, labels, scores, ks=(1, 5, 10)) -> dict:
    """HR@k, NDCG@k, MAP@k averaged over users with >= 1 positive (pessimistic tie-break).

    Returns {"hr@k": .., "ndcg@k": .., "map@k": .., "ranking_users": n, "ranking_skipped_users": m}.
    """
    y, s, u = _check(labels, scores, users)
    uniq, inv = np.unique(u, return_inverse=True)
    # rank inside user: by score descending, ties -> negatives first (pessimistic), then stable
    order = np.lexsort((y, -s, inv))
    inv_o, y_o = inv[order], y[order]
    pos = np.arange(len(y))
    new_user = np.r_[True, inv_o[1:] != inv_o[:-1]]
    rank = pos - np.maximum.accumulate(np.where(new_user, pos, 0)) + 1  # 1-based within user
    n_pos = np.bincount(inv, weights=y, minlength=len(uniq))
    has_pos = n_pos > 0
    n_users = int(has_pos.sum())
    out: dict = {"ranking_users": n_users, "ranking_skipped_users": int((~has_pos).sum())}
    hits_before = np.cumsum(y_o) - np.r_[0, np.cumsum(y_o)[:-1]][np.maximum.accumulate(np.where(new_user, pos, 0))]
    # hits_before[i] = number of positives at ranks 1..rank[i] of that user (inclusive)
    for k in ks:
        top = rank <= k
        hits = np.bincount(inv_o, weights=(y_o * top), minlength=len(uniq))
        dcg = np.bincount(inv_o, weights=(y_o * top) / np.log2(rank + 1.0), minlength=len(uniq))
        ideal_n = np.minimum(n_pos, k).astype(np.int64)
        disc = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]
        idcg = disc[ideal_n]
        ap_sum = np.bincount(inv_o, weights=(y_o * top) * hits_before / rank, minlength=len(uniq))
        with np.errstate(invalid="ignore", divide="ignore"):
            ndcg = dcg / idcg
            ap = ap_sum / ideal_n
        if n_users:
            out[f"hr@{k}"] = float((hits[has_pos] > 0).mean())
            out[f"ndcg@{k}"] = float(ndcg[has_pos].mean())
            out[f"map@{k}"] = float(ap[has_pos].mean())
        else:
            out[f"hr@{k}"] = out[f"ndcg@{k}"] = out[f"map@{k}"] = float("nan")
    return out


def compute_metrics(users, labels, scores, ks=(1, 5, 10)) -> dict:
    """All metrics on full (already gathered) arrays: auc, uauc (+ used/skipped users), hr/ndcg/map@k."""
    value, used, skipped = uauc(users, labels, scores)
    out = {"n": int(len(np.asarray(labels))), "auc": auc(labels, scores), "uauc": value,
           "uauc_users": used, "uauc_skipped_users": skipped}
    out.update(ranking_metrics(users, labels, scores, ks))
    return out


def dedup_and_check(sample_index, users, labels, scores, expected_count: int | None) -> tuple[np.ndarray, ...]:
    """Sort by sample index, drop repeats (sampler padding), check the count.

    Repeated indices must carry the same label (they are the same sample); their scores may differ
    only by non-determinism, and the first occurrence is kept. Raises DistthinkError if the number of
    distinct indices differs from expected_count, or indices fall outside 0..expected_count-1.
    """
    idx = np.asarray(sample_index, dtype=np.int64)
    u, y, s = np.asarray(users), np.asarray(labels), np.asarray(scores, dtype=np.float64)
    order = np.argsort(idx, kind="stable")
    idx, u, y, s = idx[order], u[order], y[order], s[order]
    first = np.r_[True, idx[1:] != idx[:-1]]
    if not first.all():
        group = np.cumsum(first) - 1
        if (y != y[first][group]).any():
            raise DistthinkError("the same sample index carries different labels on different ranks; "
                                 "the eval sampler and dataset disagree")
    idx, u, y, s = idx[first], u[first], y[first], s[first]
    if expected_count is not None:
        if len(idx) != expected_count or (len(idx) and (idx[0] < 0 or idx[-1] >= expected_count)):
            missing = expected_count - int(((idx >= 0) & (idx < expected_count)).sum())
            raise DistthinkError(f"gathered {len(idx)} distinct samples but the split has {expected_count} "
                                 f"({missing} missing); every sample must be scored exactly once. Check that "
                                 "the eval sampler covers the whole split (drop_last=False)")
    return idx, u, y, s


def gather_predictions(sample_index, users, labels, scores, *, group=None, expected_count: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All-gather one rank's predictions from every rank of `group`, de-duplicate, check the count.

    Inputs are this rank's 1-D arrays/tensors (equal length n_r, may be 0); sample_index and users are
    integer ids (contiguous ids from prepare), labels 0/1, scores real. Returns full numpy arrays
    (index, users, labels, scores) sorted by sample index, identical on every rank. Without an
    initialised process group it just de-duplicates locally. float64 scores travel as float64.
    """
    def _t(x, dtype):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
        return torch.as_tensor(np.asarray(x), dtype=dtype).reshape(-1)

    idx_t = _t(sample_index, torch.int64)
    usr_t = _t(users, torch.int64)
    lab_t = _t(labels, torch.int64)
    sco_t = _t(scores, torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        # NCCL only moves CUDA tensors; gloo moves CPU tensors
        dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
               else torch.device("cpu"))
        n_local = torch.tensor([idx_t.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n_local) for _ in range(world)]
        dist.all_gather(sizes, n_local, group=group)
        sizes = [int(x.item()) for x in sizes]
        max_n = max(sizes)
        # pack the four columns into one float64 tensor (ids < 2^53 survive exactly), pad to max_n
        packed = torch.zeros((max_n, 4), dtype=torch.float64)
        n = idx_t.numel()
        for c, t in enumerate((idx_t, usr_t, lab_t)):
            if (t.abs() >= 2 ** 53).any():
                raise DistthinkError("sample/user ids must be below 2^53 to be gathered exactly")
            packed[:n, c] = t.to(torch.float64)
        packed[:n, 3] = sco_t
        packed = packed.to(dev)
        parts = [torch.zeros_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed, group=group)
        full = torch.cat([p[:k] for p, k in zip(parts, sizes)]).cpu().numpy()
        idx = full[:, 0].astype(np.int64)
        usr = full[:, 1].astype(np.int64)
        lab = full[:, 2].astype(np.int64)
        sco = full[:, 3]
    else:
        idx, usr, lab, sco = idx_t.numpy(), usr_t.numpy(), lab_t.numpy(), sco_t.numpy()
    return dedup_and_check(idx, usr, lab, sco, expected_count)


def distributed_metrics(sample_index, users, labels, scores, *, split_size: int, group=None,
                        ks=(1, 5, 10)) -> dict:
    """Gather from all ranks of `group`, de-duplicate, check the count == split_size, compute all metrics.

    Every rank receives the same dict. On one process (no process group) this is compute_metrics plus
    the same de-duplication and count check.
    """
    _, usr, lab, sco = gather_predictions(sample_index, users, labels, scores, group=group,
                                          expected_count=split_size)
    out = compute_metrics(usr, lab, sco, ks)
    return out


def format_metrics(m: dict) -> str:
    """One readable line: 'auc=0.7123 uauc=0.6510 (skipped 12 users) hr@5=...'."""
    parts = []
    for k, v in m.items():
        if isinstance(v, float):
            parts.append(f"{k}={'nan' if math.isnan(v) else f'{v:.4f}'}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def write_scores(path, sample_index, users, items, labels, scores, extra: dict | None = None) -> None:
    """Write per-sample scores to Parquet: sample_index, user_id, item_id, label, score (+ extra columns).

    Call it on rank 0 with the gathered, de-duplicated arrays (all 1-D, same length).
    """
    cols = {"sample_index": np.asarray(sample_index, dtype=np.int64), "user_id": np.asarray(users, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64), "label": np.asarray(labels, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64)}
    for k, v in (extra or {}).items():
        cols[k] = np.asarray(v)
    n = {len(v) for v in cols.values()}
    if len(n) != 1:
        raise DistthinkError(f"write_scores: columns have different lengths {sorted(n)}")
    pd.DataFrame(cols).to_parquet(path, index=False)
