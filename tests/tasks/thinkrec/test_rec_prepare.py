"""`prepare`: labels, chronological splits, leakage-free histories (vs a naive loop), cold flags, id maps."""

import json

import numpy as np
import pandas as pd
import pytest

from distthink.errors import DataError
from distthink.tasks.thinkrec.interactions import Interactions
from distthink.tasks.thinkrec.prepare import find_split, history_index, prepare, read_split
from distthink.tasks.thinkrec.synthetic_world import generate


def _tiny():
    # user a: 4 interactions, two at the same time t=30; user b: 2; item z only appears late (cold)
    r = pd.DataFrame({
        "user_id": ["a", "a", "a", "a", "b", "b", "c"],
        "item_id": ["x", "y", "w", "v", "x", "z", "y"],
        "rating": [5, 2, 4, 4, 3, 5, 1],
        "timestamp": [10, 20, 30, 30, 15, 100, 90],
    })
    items = pd.DataFrame({"item_id": ["x", "y", "z", "w", "v"], "title": ["X", "Y", "Z", "W", "V"],
                          "description": "", "genres": ["drama", "comedy", "drama", "comedy", "drama"]})
    return Interactions(r, items, source="tiny")


def test_history_index_matches_naive_loop_with_ties():
    rng = np.random.default_rng(0)
    n, k = 400, 4
    user = rng.integers(0, 15, n)
    ts = rng.integers(0, 40, n)  # many equal timestamps per user
    hist, valid = history_index(user, ts, k)
    for row in range(n):
        earlier = [j for j in range(n) if user[j] == user[row] and ts[j] < ts[row]]
        # same order as the implementation: by time, equal times by row index (stable sort)
        earlier.sort(key=lambda j: (ts[j], j))
        want = earlier[-k:]
        got = hist[row][valid[row]].tolist()
        assert got == want
        assert all(ts[j] < ts[row] for j in got)  # strictly before: no leakage


def test_prepare_tiny_fields_labels_splits(tmp_path):
    meta = prepare(_tiny(), tmp_path, threshold=4, history_len=2, train_frac=0.5, valid_frac=0.2)
    tr, va, te = (read_split(find_split(tmp_path, s)) for s in ("train", "valid", "test"))
    assert len(tr) + len(va) + len(te) == 7
    assert tr["timestamp"].max() <= va["timestamp"].min() and va["timestamp"].max() <= te["timestamp"].min()
    users = pd.read_parquet(tmp_path / "users.parquet")
    items = pd.read_parquet(tmp_path / "items.parquet")
    assert users["raw_user_id"].tolist() == ["a", "b", "c"] and users["user_id"].tolist() == [0, 1, 2]
    assert items["raw_item_id"].tolist() == ["v", "w", "x", "y", "z"]
    allrows = pd.concat([tr, va, te])
    assert set(allrows.columns) >= {"user_id", "item_id", "label", "timestamp", "history_item_ids",
                                    "history_labels", "history_titles", "target_title", "cold_user", "cold_item"}
    # labels: rating >= 4
    raw = _tiny().ratings
    assert sorted(allrows["label"]) == sorted((raw["rating"] >= 4).astype(int))
    # the two rows of user a at t=30 see only x (t=10) and y (t=20), never each other
    a30 = allrows[(allrows["user_id"] == 0) & (allrows["timestamp"] == 30)]
    for _, row in a30.iterrows():
        assert list(row["history_titles"]) == ["X", "Y"] and list(row["history_labels"]) == [1, 0]
        assert list(row["history_item_ids"]) == [2, 3]
    # b's item z (t=100) and user c (t=90) never occur in train -> cold
    last = allrows.sort_values("timestamp").iloc[-1]
    assert last["cold_item"] and last["target_title"] == "Z"
    assert allrows[allrows["user_id"] == 2]["cold_user"].all()
    assert meta["splits"]["train"]["rows"] == 4 and meta["n_users"] == 3


def test_prepare_jsonl_and_reasons(tmp_path):
    prepare(_tiny(), tmp_path, history_len=3, fmt="jsonl", reasons="template", train_frac=0.5, valid_frac=0.2)
    rows = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    assert all(r["reason"].startswith("Yes." if r["label"] else "No.") for r in rows)
    with pytest.raises(DataError, match="history_len"):
        prepare(_tiny(), tmp_path, history_len=0)
    with pytest.raises(DataError, match="split fractions"):
        prepare(_tiny(), tmp_path, train_frac=0.9, valid_frac=0.2)
    no_genres = _tiny()
    no_genres.items["genres"] = ""
    with pytest.raises(DataError, match="genres"):
        prepare(no_genres, tmp_path, reasons="template")


def test_prepare_synthetic_no_leakage_end_to_end(tmp_path):
    d = generate(80, 60, seed=1)
    meta = prepare(d.interactions, tmp_path, history_len=10, reasons="template")
    splits = {s: read_split(find_split(tmp_path, s)) for s in ("train", "valid", "test")}
    full = pd.concat(splits.values(), ignore_index=True)
    ts_of = {(u, i): t for u, i, t in zip(full["user_id"], full["item_id"], full["timestamp"])}
    for _, row in full.sample(200, random_state=0).iterrows():
        assert len(row["history_item_ids"]) <= 10
        assert len(row["history_item_ids"]) == len(row["history_labels"]) == len(row["history_titles"])
        hts = [ts_of[(row["user_id"], h)] for h in row["history_item_ids"]]
        assert all(t < row["timestamp"] for t in hts) and hts == sorted(hts)
    assert meta["splits"]["test"]["empty_history"] < meta["splits"]["test"]["rows"] * 0.05
    assert sum(v["rows"] for v in meta["splits"].values()) == len(d.interactions.ratings)


def test_prepare_synthetic_one_call(tmp_path):
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    meta = prepare_synthetic(tmp_path, n_users=40, n_items=30, min_per_user=5, max_per_user=15, seed=2)
    df = read_split(find_split(tmp_path, "train"))
    assert meta["reasons"] == "template" and df["reason"].str.match(r"^(Yes|No)\. because").all()
    assert ((df["label"] == 1) == df["reason"].str.startswith("Yes.")).all()
