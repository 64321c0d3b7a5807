"""Interaction-data loaders: every source becomes one `Interactions` record.

Supported sources (`load_interactions(path, fmt=...)`):

- ``movielens``: a MovieLens-1M folder with ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)
  and ``movies.dat`` (``MovieID::Title::Genres``), both ``::``-separated and latin-1 encoded.
- ``amazon``: Amazon reviews JSON lines, either the 2014/2018 field names
  (``reviewerID, asin, overall, unixReviewTime``) or the 2023 ones
  (``user_id, parent_asin|asin, rating, timestamp`` in milliseconds). Titles come from an optional
  metadata JSON-lines file (``asin|parent_asin, title, description``) passed as ``items=``.
- ``yelp``: Yelp ``review.json`` (JSON lines: ``user_id, business_id, stars, date``); names and
  categories from an optional ``business.json`` passed as ``items=``.
- ``generic``: CSV or Parquet with ``user_id, item_id, rating, timestamp`` (integer seconds, or date
  strings parsed as UTC) and an optional items
  file (CSV/Parquet) with ``item_id, title[, description][, genres]``.
- ``pickle``: a pickled pandas DataFrame with the generic columns. Unpickling runs arbitrary code
  from the file, so it is refused unless ``trust_pickle=True`` (``--trust-pickle`` on the CLI).

Malformed input raises `DataError` naming the file, the line (1-based, as an editor shows it) or row,
the field and the fix. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from distthink.errors import DataError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

FORMATS = ("movielens", "amazon", "yelp", "generic", "pickle")
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "description", "genres")


@dataclass
class Interactions:
    """One interaction log in the generic form.

    ratings: DataFrame with columns user_id (str), item_id (str), rating (float64), timestamp (int64,
        seconds since the epoch); one row per interaction.
    items: DataFrame with columns item_id (str), title (str), description (str), genres (str,
        ``|``-separated, may be empty); one row per item. Items without metadata get an empty title
        (prepare reports how many).
    source: where it came from (for messages and the prepare meta file).
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    source: str = ""
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# helpers


def _require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found", source=str(path), fix=fix, reason="missing_file")
    return path


def _finish(ratings: pd.DataFrame, items: pd.DataFrame | None, source: str) -> Interactions:
    """Normalise dtypes, fill missing item metadata, check for NaN. Shared by every loader."""
    ratings = ratings.reset_index(drop=True)
    out = pd.DataFrame({
        "user_id": ratings["user_id"].astype(str).to_numpy(dtype=object),
        "item_id": ratings["item_id"].astype(str).to_numpy(dtype=object),
        "rating": ratings["rating"].astype("float64").to_numpy(),
        "timestamp": ratings["timestamp"].astype("int64").to_numpy(),
    })
    if items is None:
        items = pd.DataFrame({"item_id": pd.unique(out["item_id"])})
    items = items.copy()
    items["item_id"] = items["item_id"].astype(str)
    for col in ("title", "description", "genres"):
        if col not in items.columns:
            items[col] = ""
        items[col] = items[col].fillna("").astype(str)
    items = items.drop_duplicates("item_id", keep="first")
    known = set(items["item_id"])
    missing = pd.unique(out.loc[~out["item_id"].isin(known), "item_id"])
    if len(missing):
        log.info("%s: %d items have interactions but no metadata; their title is empty", source, len(missing))
        items = pd.concat([items, pd.DataFrame({"item_id": missing, "title": "", "description": "",
                                                "genres": ""})], ignore_index=True)
    items = items[list(ITEM_COLUMNS)].reset_index(drop=True)
    return Interactions(out, items, source=source, stats={"rows": len(out)})


def _check_numeric(df: pd.DataFrame, col: str, source: str, line_offset: int, fix: str) -> pd.Series:
    """Coerce a column to numbers; the first bad cell raises with its line number."""
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"expected a number, got {df[col].iloc[i]!r} ({int(bad.sum())} bad rows in all)",
                        source=source, line=i + line_offset, field=col, fix=fix, reason="bad_value")
    return values


def _read_jsonl(path: Path, required: dict[str, tuple[str, ...]], optional: dict[str, tuple[str, ...]]
                ) -> pd.DataFrame:
    """Read JSON lines; each output column takes the first alias present in a record.

    required/optional map an output column to its accepted field names. Blank lines are skipped.
    """
    cols: dict[str, list] = {k: [] for k in (*required, *optional)}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as err:
                fix = "each line must be one complete JSON object"
                if raw.lstrip().startswith("{'"):
                    fix = ("this looks like a Python-dict ('loose JSON') dump, as in the 2014 Amazon files; "
                           "convert it to JSON lines first (json.dumps(ast.literal_eval(line)))")
                raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", source=str(path),
                                line=lineno, fix=fix, reason="bad_json") from None
            if not isinstance(rec, dict):
                raise DataError("expected a JSON object", source=str(path), line=lineno,
                                fix="each line must be one JSON object", reason="bad_json")
            for out, aliases in required.items():
                for a in aliases:
                    if rec.get(a) is not None:
                        cols[out].append(rec[a])
                        break
                else:
                    raise DataError("missing field", source=str(path), line=lineno, field=" | ".join(aliases),
                                    fix=f"every record needs one of {list(aliases)}", reason="missing_field")
            for out, aliases in optional.items():
                cols[out].append(next((rec[a] for a in aliases if rec.get(a) is not None), None))
    return pd.DataFrame(cols)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        try:
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        except pd.errors.ParserError as err:
            raise DataError(f"cannot parse CSV ({err})", source=str(path),
                            fix="check quoting and the number of columns on that line", reason="bad_csv") from None
    raise DataError(f"unsupported table suffix {suffix!r}", source=str(path),
                    fix="use .csv, .tsv or .parquet", reason="bad_format")


# ----------------------------------------------------------------------------------------------------
# loaders


def load_movielens(root: str | Path) -> Interactions:
    """MovieLens-1M: ``root/ratings.dat`` and ``root/movies.dat`` (``::``-separated, latin-1)."""
    root = Path(root)
    fix = "point to the ml-1m folder holding ratings.dat and movies.dat"
    ratings_path = _require_file(root / "ratings.dat", "ratings.dat", fix)
    movies_path = _require_file(root / "movies.dat", "movies.dat", fix)

    rows = []
    for lineno, parts in _iter_dat(ratings_path, "UserID::MovieID::Rating::Timestamp"):
        try:
            rows.append((parts[0], parts[1], float(parts[2]), int(parts[3])))
        except ValueError:
            bad = "Rating" if not _is_float(parts[2]) else "Timestamp"
            raise DataError(f"not a number: {parts[2] if bad == 'Rating' else parts[3]!r}",
                            source=str(ratings_path), line=lineno, field=bad,
                            fix="Rating is a number (1-5), Timestamp is integer seconds", reason="bad_value") from None
    ratings = pd.DataFrame(rows, columns=list(INTERACTION_COLUMNS))
    items = [(p[0], p[1], "", p[2]) for _, p in _iter_dat(movies_path, "MovieID::Title::Genres")]
    return _finish(ratings, pd.DataFrame(items, columns=list(ITEM_COLUMNS)), f"movielens:{root}")


def _iter_dat(path: Path, layout: str):
    """(line number, fields) of a MovieLens `::` file (latin-1); a wrong field count names the line."""
    n_fields = len(layout.split("::"))
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != n_fields:
                raise DataError(f"expected {n_fields} '::'-separated fields, got {len(parts)}", source=str(path),
                                line=lineno, field=layout, fix=f"each line must be {layout}", reason="bad_row")
            yield lineno, parts


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_amazon(reviews: str | Path, items: str | Path | None = None) -> Interactions:
    """Amazon reviews JSON lines (2014/2018 or 2023 field names) + optional metadata JSON lines."""
    reviews = _require_file(Path(reviews), "Amazon reviews file", "pass the reviews .jsonl/.json file")
    df = _read_jsonl(reviews,
                     required={"user_id": ("reviewerID", "user_id"), "item_id": ("asin", "parent_asin"),
                               "rating": ("overall", "rating")},
                     optional={"unix": ("unixReviewTime",), "ms": ("timestamp",), "text_time": ("reviewTime",)})
    df["rating"] = _check_numeric(df, "rating", str(reviews), 1, "ratings are numbers (1-5)")
    ts = pd.to_numeric(df["unix"], errors="coerce")
    ts = ts.fillna(pd.to_numeric(df["ms"], errors="coerce") // 1000)  # the 2023 dump uses milliseconds
    if ts.isna().any():
        i = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise DataError("no usable timestamp", source=str(reviews), line=i + 1,
                        field="unixReviewTime | timestamp",
                        fix="each review needs unixReviewTime (seconds) or timestamp (milliseconds)",
                        reason="missing_field")
    df["timestamp"] = ts.astype("int64")
    meta = None
    if items is not None:
        items = _require_file(Path(items), "Amazon metadata file", "pass the meta_*.jsonl file or omit items")
        meta = _read_jsonl(items, required={"item_id": ("parent_asin", "asin")},
                           optional={"title": ("title",), "description": ("description",),
                                     "genres": ("categories", "main_category")})
        # descriptions/categories are lists in some dumps: join them into one string.
        for col in ("description", "genres"):
            meta[col] = meta[col].map(_join_text)
    return _finish(df, meta, f"amazon:{reviews}")


def _join_text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        flat = []
        for x in v:
            flat.extend(x if isinstance(x, (list, tuple)) else [x])
        return "|".join(str(x) for x in flat if x not in (None, ""))
    return str(v)


def load_yelp(reviews: str | Path, items: str | Path | None = None) -> Interactions:
    """Yelp ``review.json`` (JSON lines) + optional ``business.json`` for names/categories."""
    reviews = _require_file(Path(reviews), "Yelp review file", "pass yelp_academic_dataset_review.json")
    df = _read_jsonl(reviews, required={"user_id": ("user_id",), "item_id": ("business_id",),
                                        "rating": ("stars",), "date": ("date",)}, optional={})
    df["rating"] = _check_numeric(df, "rating", str(reviews), 1, "stars are numbers (1-5)")
    dates = pd.to_datetime(df["date"], errors="coerce", format="mixed")
    if dates.isna().any():
        i = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise DataError(f"cannot parse date {df['date'].iloc[i]!r}", source=str(reviews), line=i + 1, field="date",
                        fix="use 'YYYY-MM-DD HH:MM:SS'", reason="bad_value")
    df["timestamp"] = (dates.astype("datetime64[s]").astype("int64")).to_numpy()
    meta = None
    if items is not None:
        items = _require_file(Path(items), "Yelp business file", "pass yelp_academic_dataset_business.json")
        meta = _read_jsonl(items, required={"item_id": ("business_id",)},
                           optional={"title": ("name",), "genres": ("categories",), "city": ("city",)})
        meta["description"] = meta["city"].fillna("").astype(str)
        meta["genres"] = meta["genres"].fillna("").astype(str).str.replace(", ", "|")
    return _finish(df, meta, f"yelp:{reviews}")


def load_generic(interactions: str | Path, items: str | Path | None = None) -> Interactions:
    """CSV/Parquet with user_id, item_id, rating, timestamp (+ items file with item_id, title, ...)."""
    path = _require_file(Path(interactions), "interactions file", "pass a .csv or .parquet file")
    df = _read_table(path)
    missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {list(df.columns)}", source=str(path),
                        field=missing[0], fix="rename the columns to user_id, item_id, rating, timestamp",
                        reason="missing_field")
    # CSV line numbers: header is line 1, so row i sits on line i + 2. Parquet: report the 0-based row.
    offset = 2 if path.suffix.lower() != ".parquet" else 0
    for col in ("user_id", "item_id"):
        empty = df[col].isna() | (df[col].astype(str).str.len() == 0)
        if empty.any():
            i = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError("empty id", source=str(path), line=i + offset, field=col,
                            fix="every row needs a user_id and an item_id", reason="missing_field")
    df["rating"] = _check_numeric(df, "rating", str(path), offset, "ratings are numbers")
    df["timestamp"] = _timestamps(df["timestamp"], str(path), offset)
    meta = None
    if items is not None:
        ipath = _require_file(Path(items), "items file", "pass a .csv or .parquet items file or omit it")
        meta = _read_table(ipath)
        if "item_id" not in meta.columns:
            raise DataError(f"missing column 'item_id'; found {list(meta.columns)}", source=str(ipath),
                            field="item_id", fix="the items file needs item_id and title columns",
                            reason="missing_field")
    return _finish(df, meta, f"generic:{path}")


def _timestamps(col: pd.Series, source: str, offset: int) -> np.ndarray:
    """Integer seconds, or date/time strings ("2016-03-09 12:00:00", ISO 8601) converted to seconds (UTC)."""
    if pd.api.types.is_datetime64_any_dtype(col):
        return col.astype("datetime64[s]").astype("int64").to_numpy()
    numbers = pd.to_numeric(col, errors="coerce")
    if numbers.notna().all():
        return numbers.astype("int64").to_numpy()
    if numbers.notna().any():  # mostly numbers: report the first bad one
        _check_numeric(pd.DataFrame({"timestamp": col}), "timestamp", source, offset,
                       "timestamps are integer seconds since the epoch (or all date strings)")
    dates = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
    if dates.isna().any():
        i = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise DataError(f"neither integer seconds nor a date: {col.iloc[i]!r}", source=source, line=i + offset,
                        field="timestamp", fix="use integer seconds since the epoch or 'YYYY-MM-DD HH:MM:SS'",
                        reason="bad_value")
    return dates.dt.tz_localize(None).astype("datetime64[s]").astype("int64").to_numpy()


def load_pickle(path: str | Path, *, trust_pickle: bool = False) -> Interactions:
    """A pickled pandas DataFrame (the original ThinkRec/CoLLM files). Needs ``trust_pickle=True``.

    Accepted columns: user_id|uid, item_id|iid, rating|label, timestamp, and optionally title.
    """
    path = Path(path)
    if not trust_pickle:
        raise DataError("refusing to unpickle: loading a pickle runs arbitrary code stored in the file",
                        source=str(path), fix="convert it to Parquet/CSV, or pass --trust-pickle if you "
                        "produced the file yourself", reason="untrusted_pickle")
    _require_file(path, "pickle file", "pass the .pkl file")
    df = pd.read_pickle(path)  # noqa: S301 - gated by trust_pickle above
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}", source=str(path),
                        fix="pickle a DataFrame with user/item/rating/timestamp columns", reason="bad_format")
    alias = {"uid": "user_id", "iid": "item_id", "label": "rating"}
    df = df.rename(columns={k: v for k, v in alias.items() if k in df.columns and v not in df.columns})
    missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {list(df.columns)}", source=str(path),
                        field=missing[0], fix="the frame needs user_id/uid, item_id/iid, rating/label, timestamp",
                        reason="missing_field")
    meta = None
    if "title" in df.columns:
        meta = df[["item_id", "title"]].drop_duplicates("item_id")
    return _finish(df, meta, f"pickle:{path}")


def load_interactions(path: str | Path, fmt: str = "generic", *, items: str | Path | None = None,
                      trust_pickle: bool = False) -> Interactions:
    """Dispatch on ``fmt`` (one of FORMATS). ``path`` is a folder for movielens, a file otherwise."""
    if fmt == "movielens":
        return load_movielens(path)
    if fmt == "amazon":
        return load_amazon(path, items)
    if fmt == "yelp":
        return load_yelp(path, items)
    if fmt == "generic":
        return load_generic(path, items)
    if fmt == "pickle":
        return load_pickle(path, trust_pickle=trust_pickle)
    raise DataError(f"unknown format {fmt!r}", field="format", fix=f"use one of {list(FORMATS)}",
                    reason="bad_format")
