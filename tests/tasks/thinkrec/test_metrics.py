"""Metrics against independent references: sklearn's roc_auc_score and a naive per-user loop."""

import math
import os
import socket

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from distthink.errors import DistthinkError
from distthink.tasks.thinkrec.metrics import (
    auc,
    compute_metrics,
    dedup_and_check,
    distributed_metrics,
    per_user_auc,
    ranking_metrics,
    uauc,
)


def _naive_ranking(users, labels, scores, k):
    """Textbook per-user loop; pessimistic ties = negatives first at equal score."""
    hr, ndcg, ap, skipped = [], [], [], 0
    for u in sorted(set(users)):
        rows = [(s, y) for uu, y, s in zip(users, labels, scores) if uu == u]
        n_pos = sum(y for _, y in rows)
        if n_pos == 0:
            skipped += 1
            continue
        ranked = [y for s, y in sorted(rows, key=lambda r: (-r[0], r[1]))][:k]
        hr.append(1.0 if any(ranked) else 0.0)
        dcg = sum(y / math.log2(i + 2) for i, y in enumerate(ranked))
        idcg = sum(1 / math.log2(i + 2) for i in range(min(n_pos, k)))
        ndcg.append(dcg / idcg)
        hits, prec_sum = 0, 0.0
        for i, y in enumerate(ranked):
            if y:
                hits += 1
                prec_sum += hits / (i + 1)
        ap.append(prec_sum / min(n_pos, k))
    return np.mean(hr), np.mean(ndcg), np.mean(ap), skipped


def test_auc_known_cases_and_ties():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    # 2 pos x 2 neg; pairs: (0.4>0.1) (0.4>0.4 tie) (0.2>0.1) (0.2<0.4) -> (1 + .5 + 1 + 0) / 4
    assert auc([1, 0, 1, 0], [0.4, 0.4, 0.2, 0.1]) == pytest.approx(0.625)
    assert math.isnan(auc([1, 1], [0.1, 0.2]))


def test_auc_matches_sklearn_with_heavy_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        s = rng.integers(0, 4, n).astype(float)  # few distinct values -> many ties
        # float64 ratios of pair counts (n <= 200): a few roundings of 1e-16 apart; one swapped pair is >= 1e-5
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_uauc_skips_single_class_users_and_matches_sklearn():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 600)
    y = rng.integers(0, 2, 600)
    y[users == 3] = 1  # single-class users
    y[users == 7] = 0
    s = np.round(rng.normal(size=600), 1)
    value, used, skipped = uauc(users, y, s)
    ref = [roc_auc_score(y[users == u], s[users == u]) for u in np.unique(users)
           if 0 < y[users == u].sum() < (users == u).sum()]
    assert used == len(ref) and skipped == 30 - len(ref) and skipped >= 2
    assert value == pytest.approx(np.mean(ref), abs=1e-12)  # float64 means of <= 30 AUCs: ~1e-16 apart
    ids, per = per_user_auc(users, y, s)
    assert math.isnan(per[list(ids).index(3)]) and math.isnan(per[list(ids).index(7)])


def test_ranking_metrics_match_naive_loop():
    rng = np.random.default_rng(2)
    users = rng.integers(0, 12, 150)
    y = rng.integers(0, 2, 150)
    y[users == 5] = 0  # a user with no positive is skipped
    s = rng.integers(0, 5, 150).astype(float)  # ties
    got = ranking_metrics(users, y, s, ks=(1, 3, 10))
    for k in (1, 3, 10):
        hr, ndcg, ap, skipped = _naive_ranking(list(users), list(y), list(s), k)
        assert got[f"hr@{k}"] == pytest.approx(hr)
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg)
        assert got[f"map@{k}"] == pytest.approx(ap)
        assert got["ranking_skipped_users"] == skipped == 1


def test_ranking_known_case():
    # one user, 4 candidates ranked [pos, neg, pos, neg]
    m = ranking_metrics([0] * 4, [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], ks=(2,))
    assert m["hr@2"] == 1.0
    assert m["ndcg@2"] == pytest.approx(1.0 / (1 + 1 / math.log2(3)))
    assert m["map@2"] == pytest.approx(0.5)  # (1/min(2,2)) * (1/1)
    # a constant scorer gets no credit from ties
    assert ranking_metrics([0] * 3, [1, 0, 0], [0.5] * 3, ks=(1,))["hr@1"] == 0.0


def test_dedup_and_count_check():
    idx, u, y, s = dedup_and_check([2, 0, 1, 0], [5, 4, 4, 4], [1, 0, 1, 0], [.2, .1, .3, .1], expected_count=3)
    assert idx.tolist() == [0, 1, 2] and s.tolist() == [.1, .3, .2]
    with pytest.raises(DistthinkError, match="2 distinct samples but the split has 3"):
        dedup_and_check([0, 1, 1], [0, 0, 0], [0, 1, 1], [0, 0, 0], expected_count=3)
    with pytest.raises(DistthinkError, match="different labels"):
        dedup_and_check([0, 0], [0, 0], [0, 1], [0, 0], expected_count=1)
    with pytest.raises(DistthinkError, match="labels must be 0 or 1"):
        auc([0, 2], [0.1, 0.2])


def _data(n=101):
    rng = np.random.default_rng(3)
    users = rng.integers(0, 9, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n), 2)
    return users, y, s


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, out_path):
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        users, y, s = _data()
        # DistributedSampler pads 101 -> 102 samples by repeating index 0: the duplicate must be dropped
        idx = np.array(list(DistributedSampler(range(len(y)), num_replicas=world, rank=rank, shuffle=True, seed=1)))
        m = distributed_metrics(idx, users[idx], y[idx], s[idx], split_size=len(y), ks=(1, 5))
        if rank == 0:
            import json
            with open(out_path, "w") as f:
                json.dump(m, f)
        # a rank that loses its samples must make every rank fail the count check
        try:
            keep = idx if rank == 0 else idx[:0]
            distributed_metrics(keep, users[keep], y[keep], s[keep], split_size=len(y))
            raise AssertionError("count check did not fire")
        except DistthinkError:
            pass
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gather_equals_one_rank(tmp_path):
    import json

    import torch.multiprocessing as mp

    users, y, s = _data()
    single = compute_metrics(users, y, s, ks=(1, 5))
    assert distributed_metrics(np.arange(len(y)), users, y, s, split_size=len(y), ks=(1, 5)) == single
    out = tmp_path / "m.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == pytest.approx(single)
    assert json.loads(out.read_text()) == single  # exact, not just close


def test_write_scores_roundtrip(tmp_path):
    import pandas as pd

    from distthink.tasks.thinkrec.metrics import write_scores

    write_scores(tmp_path / "s.parquet", [0, 1], [3, 4], [7, 8], [1, 0], [0.25, -1.5], {"group": [0, 2]})
    df = pd.read_parquet(tmp_path / "s.parquet")
    assert df.to_dict("list") == {"sample_index": [0, 1], "user_id": [3, 4], "item_id": [7, 8], "label": [1, 0],
                                  "score": [0.25, -1.5], "group": [0, 2]}
    with pytest.raises(DistthinkError, match="different lengths"):
        write_scores(tmp_path / "t.parquet", [0], [1, 2], [0], [0], [0.0])
