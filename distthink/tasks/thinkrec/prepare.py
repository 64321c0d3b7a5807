"""Interactions -> ThinkRec samples: labels, chronological splits, leakage-free histories, id maps.

`prepare(interactions, out_dir, ...)` writes:

- ``train|valid|test.{parquet|jsonl}``: one row per interaction with
    user_id (int, contiguous), item_id (int, contiguous), label (int 0/1), rating (float),
    timestamp (int seconds), history_item_ids (list[int]), history_labels (list[int]),
    history_titles (list[str]), target_title (str), cold_user (bool), cold_item (bool),
    reason (str, only with ``reasons="template"``, which needs item genres; see synthetic.py)
- ``users.parquet``: user_id (int), raw_user_id (str), n_train (int)
- ``items.parquet``: item_id (int), raw_item_id (str), title, description, genres, n_train (int)
- ``prepare_meta.json``: threshold, history_len, split fractions and time cut-offs, row/positive/cold
  counts per split, source.

Definitions (documented in docs/thinkrec.md):

- label = rating >= threshold.
- Chronological global split: rows sorted by (timestamp, raw user, raw item); the first
  ``train_frac`` go to train, the next ``valid_frac`` to valid, the rest to test. The split is by
  time over the whole log (not per user), so no training row is later than a validation row.
- History of a row = the user's last ``history_len`` interactions with a timestamp *strictly
  earlier* than the row's timestamp, oldest first, from the full log (a test row may see the user's
  earlier valid/test interactions, as a deployed recommender would). Rows with the same timestamp
  never see each other: that would leak the target's own session.
- cold_user: the user has no train interaction; cold_item: the item has no train interaction.
- Ids: raw ids are mapped to 0..n-1 in sorted order of the raw id string, over *all* splits, so CF
  tables cover every id (cold ids simply stay near their initialisation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from distthink.errors import DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec.interactions import Interactions
from distthink.tasks.thinkrec.prompts import template_reason

log = get_logger(__name__)
SPLITS = ("train", "valid", "test")


def binarize(rating: np.ndarray, threshold: float) -> np.ndarray:
    """label = 1 where rating >= threshold, else 0 (int8)."""
    return (np.asarray(rating, dtype=np.float64) >= threshold).astype(np.int8)


def chronological_split(timestamp: np.ndarray, tiebreak: list[np.ndarray], train_frac: float,
                        valid_frac: float) -> np.ndarray:
    """Split index per row (0 train, 1 valid, 2 test) by global time order.

    tiebreak: extra sort keys (raw user, raw item) so that equal timestamps split deterministically.
    """
    if not (0 < train_frac < 1 and 0 <= valid_frac < 1 and train_frac + valid_frac < 1):
        raise DataError(f"bad split fractions train={train_frac} valid={valid_frac}", field="split",
                        fix="use 0 < train, 0 <= valid, train + valid < 1 (test gets the rest)",
                        reason="bad_config")
    n = len(timestamp)
    order = np.lexsort((*reversed(tiebreak), timestamp))
    n_train = int(round(train_frac * n))
    n_valid = int(round(valid_frac * n))
    split = np.empty(n, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_valid]] = 1
    split[order[n_train + n_valid:]] = 2
    return split


def history_index(user: np.ndarray, timestamp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every row, the row indices of the user's last k interactions strictly before it.

    Returns (hist, valid): hist (n, k) int64 row indices, oldest first and right-aligned (the most
    recent item is in column k-1); valid (n, k) bool marks real entries. Vectorised: one sort plus
    index arithmetic, no Python loop over rows.
    """
    n = len(user)
    order = np.lexsort((timestamp, user))  # by user, then time
    u_sorted, t_sorted = user[order], timestamp[order]
    pos = np.arange(n)
    new_user = np.r_[True, u_sorted[1:] != u_sorted[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    # first sorted position holding this (user, timestamp): everything before it is strictly earlier
    new_tie = new_user | np.r_[True, t_sorted[1:] != t_sorted[:-1]]
    tie_start = np.maximum.accumulate(np.where(new_tie, pos, 0))
    cols = tie_start[:, None] - k + np.arange(k)[None, :]
    valid_sorted = cols >= user_start[:, None]
    hist_sorted = order[np.where(valid_sorted, cols, 0)]
    hist = np.empty((n, k), dtype=np.int64)
    valid = np.empty((n, k), dtype=bool)
    hist[order], valid[order] = hist_sorted, valid_sorted
    return hist, valid


def _list_array(values: np.ndarray, valid: np.ndarray, pa_type) -> pa.ListArray:
    """(n, k) values + validity -> Arrow list column holding only the valid entries, in order."""
    counts = valid.sum(axis=1)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    flat = pa.array(values[valid], type=pa_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def prepare(data: Interactions, out_dir: str | Path, *, threshold: float = 4.0, history_len: int = 10,
            train_frac: float = 0.8, valid_frac: float = 0.1, reasons: str = "none",
            fmt: str = "parquet") -> dict:
    """Write the ThinkRec splits (see the module docstring). Returns the meta dict that is also saved."""
    if history_len < 1:
        raise DataError(f"history_len must be >= 1, got {history_len}", field="history_len",
                        fix="use --history-len 10 (the ThinkRec default)", reason="bad_config")
    if fmt not in ("parquet", "jsonl"):
        raise DataError(f"unknown output format {fmt!r}", field="format", fix="use parquet or jsonl",
                        reason="bad_config")
    if reasons not in ("none", "template"):
        raise DataError(f"unknown reasons mode {reasons!r}", field="reasons", fix="use none or template",
                        reason="bad_config")
    r = data.ratings
    if len(r) == 0:
        raise DataError("no interactions", source=data.source, fix="check the input file", reason="empty")
    n_dup = int(r.duplicated(["user_id", "item_id", "timestamp"]).sum())
    if n_dup:
        log.info("%d duplicate (user, item, timestamp) rows kept as separate interactions", n_dup)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw_u = r["user_id"].to_numpy(dtype=object)
    raw_i = r["item_id"].to_numpy(dtype=object)
    users, uid = np.unique(raw_u.astype(str), return_inverse=True)
    items_present = r["item_id"].astype(str).unique()
    items_tab = data.items[data.items["item_id"].isin(set(items_present))]
    item_ids, iid = np.unique(raw_i.astype(str), return_inverse=True)
    ts = r["timestamp"].to_numpy(dtype=np.int64)
    label = binarize(r["rating"].to_numpy(), threshold)
    split = chronological_split(ts, [uid, iid], train_frac, valid_frac)

    meta_items = items_tab.set_index("item_id").reindex(item_ids)
    titles = meta_items["title"].fillna("").astype(str).to_numpy(dtype=object)
    n_untitled = int((titles == "").sum())
    if n_untitled:
        log.info("%d of %d items have no title; their title is the empty string", n_untitled, len(titles))

    is_train = split == 0
    n_train_user = np.bincount(uid[is_train], minlength=len(users))
    n_train_item = np.bincount(iid[is_train], minlength=len(item_ids))
    cold_user = n_train_user[uid] == 0
    cold_item = n_train_item[iid] == 0

    hist, hvalid = history_index(uid, ts, history_len)
    h_items = iid[hist]
    h_labels = label[hist]

    reason_col = None
    if reasons == "template":
        reason_col = _template_reasons(meta_items, item_ids, iid, label, hist, hvalid, titles)

    cut = {}
    table_all = {
        "user_id": pa.array(uid.astype(np.int64)),
        "item_id": pa.array(iid.astype(np.int64)),
        "label": pa.array(label.astype(np.int64)),
        "rating": pa.array(r["rating"].to_numpy(dtype=np.float64)),
        "timestamp": pa.array(ts),
        "history_item_ids": _list_array(h_items.astype(np.int64), hvalid, pa.int64()),
        "history_labels": _list_array(h_labels.astype(np.int64), hvalid, pa.int64()),
        "history_titles": _list_array(titles[h_items], hvalid, pa.string()),
        "target_title": pa.array(titles[iid], type=pa.string()),
        "cold_user": pa.array(cold_user),
        "cold_item": pa.array(cold_item),
    }
    if reason_col is not None:
        table_all["reason"] = pa.array(reason_col, type=pa.string())
    full = pa.table(table_all)

    counts = {}
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == s)
        idx = idx[np.lexsort((iid[idx], uid[idx], ts[idx]))]  # time order inside each file
        part = full.take(pa.array(idx))
        path = out / f"{name}.{fmt}"
        if fmt == "parquet":
            pq.write_table(part, path)
        else:
            part.to_pandas().to_json(path, orient="records", lines=True, force_ascii=False)
        counts[name] = {"rows": len(idx), "positives": int(label[idx].sum()),
                        "users": int(len(np.unique(uid[idx]))), "cold_users": int(cold_user[idx].sum()),
                        "cold_items": int(cold_item[idx].sum()),
                        "empty_history": int((~hvalid[idx].any(axis=1)).sum())}
        if len(idx):
            cut[name] = [int(ts[idx].min()), int(ts[idx].max())]

    pd.DataFrame({"user_id": np.arange(len(users)), "raw_user_id": users.astype(str),
                  "n_train": n_train_user}).to_parquet(out / "users.parquet", index=False)
    pd.DataFrame({"item_id": np.arange(len(item_ids)), "raw_item_id": item_ids.astype(str),
                  "title": titles.astype(str), "description": meta_items["description"].fillna("").astype(str).to_numpy(),
                  "genres": meta_items["genres"].fillna("").astype(str).to_numpy(),
                  "n_train": n_train_item}).to_parquet(out / "items.parquet", index=False)
    meta = {"source": data.source, "threshold": threshold, "history_len": history_len,
            "train_frac": train_frac, "valid_frac": valid_frac, "format": fmt, "reasons": reasons,
            "n_users": int(len(users)), "n_items": int(len(item_ids)), "untitled_items": n_untitled,
            "time_range": cut, "splits": counts}
    (out / "prepare_meta.json").write_text(json.dumps(meta, indent=1))
    log.info("prepared %s: %s", out, {k: v["rows"] for k, v in counts.items()})
    return meta


def _template_reasons(meta_items: pd.DataFrame, item_ids, iid, label, hist, hvalid, titles) -> list[str]:
    genres = meta_items["genres"].fillna("").astype(str).to_numpy()
    if (genres == "").all():
        raise DataError("reasons=template needs item genres, but no item has any", field="genres",
                        fix="provide a genres column in the items file, or use --reasons none",
                        reason="missing_field")
    glist = [g.split("|") if g else [] for g in genres]
    out = []
    for row in range(len(iid)):  # text generation: a Python loop is unavoidable and runs once, offline
        hv = hist[row][hvalid[row]]
        out.append(template_reason(int(label[row]), titles[iid[row]], glist[iid[row]],
                                   [titles[iid[h]] for h in hv], [glist[iid[h]] for h in hv],
                                   [int(label[h]) for h in hv]))
    return out


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a prepared split (.parquet or .jsonl) into a DataFrame with list columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError("prepared split not found", source=str(path),
                        fix="run `distthink rec prepare` first and pass its output folder", reason="missing_file")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True)


def find_split(prepared_dir: str | Path, name: str) -> Path:
    """The path of split `name` in a prepared folder, whichever format it was written in."""
    d = Path(prepared_dir)
    for suffix in (".parquet", ".jsonl"):
        if (d / f"{name}{suffix}").is_file():
            return d / f"{name}{suffix}"
    raise DataError(f"no {name}.parquet or {name}.jsonl", source=str(d),
                    fix="run `distthink rec prepare` into this folder first", reason="missing_file")
