"""Where the CF vectors injected into ThinkRec prompts come from: ``task.options.cf_export`` (and ``rec group --cf``,
``rec eval --cf``) names one of

- a folder written by ``distthink rec train-cf`` (``cf_meta.json``): user / item tables, and for SASRec / DCN / DIN
  the encoder that computes a row's user vector from its history (and target);
- ``.npz`` shards keyed by id: one ``.npz`` file or a folder of them, each holding ``user_ids`` (n,) +
  ``user_emb`` (n, d) and/or ``item_ids`` (m,) + ``item_emb`` (m, d). Ids are the split rows' ``user_id`` /
  ``item_id`` values; an id present in two shards is an error. Read with ``allow_pickle=False``;
- ``inline``: every row of the split carries its vectors, ThinkRec's record layout: ``User_emb`` (d),
  ``TargetItem_emb`` (d) and optionally ``History_embs`` (one vector per history item, in order). A vector is a
  JSON list of numbers or a base64 string of little-endian float32 bytes. Without a ``History_embs`` column the
  history is listed by title only (no ``<ItemID>`` tokens).

Every vector is validated where it enters: the dimension (one d for all), finite values, and for table sources
that every id a row names (user, target, history items) has a vector. A bad row is a DataError naming the split
file, the line (row + 1), the field and the fix; with ``data.on_error: skip`` (training) it is skipped and counted
by reason instead, and the counts are logged.

`CFSource.rows(df, ...)` returns the per-row vectors the samples carry (`RowVectors`); tables stay with the source
and the wrapper looks them up by id (no per-row copy of a table row).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distthink.data.dataset import iter_records
from distthink.errors import CheckpointError, ConfigError, DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec.cf import CFExport, load_cf_export, split_from_frame

log = get_logger(__name__)

INLINE = "inline"
INLINE_FIELDS = ("User_emb", "TargetItem_emb", "History_embs")
_SPEC_FIX = ("pass the folder written by `distthink rec train-cf`, an .npz file / folder of .npz shards (user_ids, "
             "user_emb, item_ids, item_emb), or `inline` (vectors in the rows: User_emb, TargetItem_emb, History_embs)")


@dataclass
class RowVectors:
    """Per-row vectors of the kept rows (float32). None = looked up in the source's tables by id instead.

    user (n, d), target (n, d); history: one (h_i, d) array per row, h_i = the row's history length;
    kept (N,) bool over the input rows; skipped {reason: count}; errors {row index: DataError} of the skipped rows;
    history_ids: False when rows carry no history vectors and no table can give them (inline without History_embs):
    the prompt then lists titles only."""

    user: np.ndarray | None
    target: np.ndarray | None
    history: list | None
    kept: np.ndarray
    skipped: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    history_ids: bool = True


class CFSource:
    """Base: tables (``user`` (n_users, d), ``item`` (n_items, d) torch float32, or None) and row validation."""

    spec: str
    dim: int
    user: torch.Tensor | None = None
    item: torch.Tensor | None = None
    user_known: np.ndarray | None = None   # bool per user id: has a vector (npz shards)
    item_known: np.ndarray | None = None

    @property
    def per_row_user(self) -> bool:
        """True when a row's user vector depends on the row (its history / target), not only on the user id."""
        return False

    def rows(self, df: pd.DataFrame, *, source: str, on_error: str = "raise", lines=None,
             quiet: bool = False) -> RowVectors:
        """Validate the rows against this source; per-row vectors of the kept rows (see RowVectors). Row i is line
        lines[i] of `source` (default i + 1; a chunk of a streamed split gives its own); quiet: no warning about skips (the
        caller reports them)."""
        kept, skipped, errors = _validate(df, lambda line, row: self._check_row(row, source, line), on_error, source,
                                          lines, quiet)
        return RowVectors(None, None, None, kept, skipped, errors)

    def _check_row(self, row: dict, source: str, line: int) -> None:
        n_users, n_items = self.user.shape[0], self.item.shape[0]
        checks = [("user_id", [row["user_id"]], n_users, self.user_known),
                  ("item_id", [row["item_id"]], n_items, self.item_known),
                  ("history_item_ids", list(row.get("history_item_ids", [])), n_items, self.item_known)]
        for name, ids, n, known in checks:
            for v in ids:
                v = int(v)
                if not 0 <= v < n or (known is not None and not known[v]):
                    raise DataError(f"id {v} has no CF vector in {self.spec}", source=source, line=line, field=name,
                                    fix="use the CF export / shards built for this prepared data (every user and "
                                        "item id of the split needs a vector), or data.on_error=skip",
                                    reason="cf_missing_id")

    def fingerprint(self) -> str | None:
        """sha256 of the vectors (not of the files), so a copied export keeps it; None when rows carry them."""
        h = hashlib.sha256()
        for t in (self.user, self.item):
            t = t.detach().float().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def score_rows(self, df: pd.DataFrame, *, source: str) -> np.ndarray:
        """(n,) dot-product scores of the rows, as the CF model scores them (rec eval --cf)."""
        u = torch.as_tensor(df["user_id"].to_numpy(), dtype=torch.long)
        i = torch.as_tensor(df["item_id"].to_numpy(), dtype=torch.long)
        return (self.user[u] * self.item[i]).sum(-1).double().numpy()

    def users_frame(self) -> pd.DataFrame:
        """user_id, raw_user_id (+ n_train when known) of the users with a vector (what `rec group` clusters)."""
        raise NotImplementedError


class ExportSource(CFSource):
    """A `rec train-cf` export: tables; SASRec / DCN / DIN encode each row's user vector (history / target)."""

    def __init__(self, export: CFExport):
        self.export, self.spec = export, str(export.path)
        self.user, self.item, self.dim = export.user, export.item, int(export.meta["dim"])

    @property
    def per_row_user(self) -> bool:
        return self.export.user_vector != "table"

    def rows(self, df: pd.DataFrame, *, source: str, on_error: str = "raise", lines=None,
             quiet: bool = False) -> RowVectors:
        out = super().rows(df, source=source, on_error=on_error, lines=lines, quiet=quiet)
        if self.per_row_user and out.kept.any():
            cfg = self.export.meta.get("config", {})
            split = split_from_frame(df[out.kept], self.item.shape[0], int(cfg.get("history_len", 10)), source)
            out.user = self.export.row_user_vectors(split).numpy().astype(np.float32)
        return out

    def fingerprint(self) -> str | None:
        tables = super().fingerprint()
        if not self.per_row_user:
            return tables
        # the encoder makes the row vectors: its weights are part of the CF space
        h = hashlib.sha256(tables.encode())
        h.update((self.export.path / f"{self.export.meta['model']}.safetensors").read_bytes())
        return h.hexdigest()

    def score_rows(self, df: pd.DataFrame, *, source: str) -> np.ndarray:
        cfg = self.export.meta.get("config", {})
        split = split_from_frame(df, self.item.shape[0], int(cfg.get("history_len", 10)), source)
        return self.export.score_split(split).double().numpy()

    def users_frame(self) -> pd.DataFrame:
        return self.export.users.reset_index(drop=True)


class NpzSource(CFSource):
    """Tables from .npz shards keyed by id (module docstring); ids without a vector are marked unknown."""

    def __init__(self, path: Path):
        self.spec = str(path)
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        if not files:
            raise ConfigError(f"task.options.cf_export={path}: no .npz shard in the folder. Fix: {_SPEC_FIX}")
        parts = {"user": ([], []), "item": ([], [])}
        dims = set()
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError) as err:
                raise DataError(f"not a readable .npz ({err})", source=str(f), fix="write shards with numpy.savez "
                                "(no object arrays)", reason="cf_bad_file") from None
            if not any(f"{kind}_ids" in arrays for kind in parts):
                raise DataError("holds neither user_ids/user_emb nor item_ids/item_emb", source=str(f),
                                field="user_ids", fix="name the arrays user_ids, user_emb, item_ids, item_emb",
                                reason="cf_bad_file")
            for kind in parts:
                if f"{kind}_ids" not in arrays and f"{kind}_emb" not in arrays:
                    continue
                ids, emb = _shard_pair(arrays, kind, f)
                dims.add(emb.shape[1])
                parts[kind][0].append(ids)
                parts[kind][1].append(emb)
        if len(dims) != 1:
            raise DataError(f"the shards hold vectors of different dimensions {sorted(dims)}", source=str(path),
                            field="user_emb", fix="one embedding size for users and items", reason="cf_dim")
        self.dim = dims.pop()
        for kind, (ids_list, emb_list) in parts.items():
            if not ids_list:
                raise DataError(f"no {kind} vectors in any shard", source=str(path), field=f"{kind}_emb",
                                fix=f"add {kind}_ids and {kind}_emb arrays (both users and items are injected)",
                                reason="cf_missing_id")
            ids, emb = np.concatenate(ids_list), np.concatenate(emb_list)
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise DataError(f"{kind} id {int(uniq[counts > 1][0])} appears more than once across the shards",
                                source=str(path), field=f"{kind}_ids", fix="write each id once",
                                reason="cf_duplicate_id")
            table = np.zeros((int(ids.max()) + 1, self.dim), dtype=np.float32)
            known = np.zeros(len(table), dtype=bool)
            table[ids], known[ids] = emb, True
            setattr(self, kind, torch.from_numpy(table))
            setattr(self, f"{kind}_known", known)
        log.info("CF vectors from %d .npz shard(s) %s: %d users, %d items, dim %d", len(files), path,
                 int(self.user_known.sum()), int(self.item_known.sum()), self.dim)

    def users_frame(self) -> pd.DataFrame:
        ids = np.nonzero(self.user_known)[0]
        return pd.DataFrame({"user_id": ids, "raw_user_id": ids.astype(str)})


class InlineSource(CFSource):
    """Vectors in the rows (ThinkRec's record layout): User_emb, TargetItem_emb, optional History_embs."""

    spec = INLINE
    dim = 0  # known once rows are read (`rows`); the wrapper reads it from the samples

    def rows(self, df: pd.DataFrame, *, source: str, on_error: str = "raise", lines=None,
             quiet: bool = False) -> RowVectors:
        missing = [f for f in INLINE_FIELDS[:2] if f not in df.columns]
        if missing:
            raise DataError(f"cf_export=inline but the split has no {' / '.join(missing)} column", source=source,
                            field=missing[0], fix="add the vectors to every row (JSON lists or base64 float32), "
                            "or set task.options.cf_export to a CF export / .npz shards", reason="cf_missing_field")
        with_hist = INLINE_FIELDS[2] in df.columns
        dims: dict[str, int] = {}
        parsed: list[tuple] = []

        def check(line: int, row: dict) -> None:
            u = _vector(row["User_emb"], source, line, "User_emb", dims)
            t = _vector(row["TargetItem_emb"], source, line, "TargetItem_emb", dims)
            h = np.zeros((0, u.shape[0]), np.float32)
            if with_hist:
                raw = row["History_embs"]
                raw = [] if raw is None else list(raw)
                n_hist = len(row.get("history_item_ids", []))
                if len(raw) != n_hist:
                    raise DataError(f"History_embs holds {len(raw)} vectors for {n_hist} history items",
                                    source=source, line=line, field="History_embs",
                                    fix="one vector per history_item_ids entry, in the same order",
                                    reason="cf_history_length")
                h = np.stack([_vector(x, source, line, "History_embs", dims) for x in raw]) if raw else h
            parsed.append((u, t, h))

        kept, skipped, errors = _validate(df, check, on_error, source, lines, quiet)
        if not parsed:
            d = 0
            return RowVectors(np.zeros((0, d), np.float32), np.zeros((0, d), np.float32), [], kept, skipped, errors,
                              history_ids=with_hist)
        self.dim = parsed[0][0].shape[0]
        return RowVectors(np.stack([p[0] for p in parsed]), np.stack([p[1] for p in parsed]),
                          [p[2] for p in parsed], kept, skipped, errors, history_ids=with_hist)

    def probe_dim(self, path: str | Path) -> int:
        """The vector size, from the split's first row: what the wrapper's projector needs on every rank, also when
        the split comes from the cache and was never read here."""
        for _src, line, row in iter_records(str(path)):
            if isinstance(row, dict) and "User_emb" in row:
                self.dim = int(_vector(row["User_emb"], str(path), line, "User_emb", {}).shape[0])
                break
        return self.dim

    @property
    def per_row_user(self) -> bool:
        return True

    def fingerprint(self) -> str | None:
        return None

    def score_rows(self, df: pd.DataFrame, *, source: str) -> np.ndarray:
        v = self.rows(df, source=source)
        return (v.user.astype(np.float64) * v.target).sum(-1)

    def users_frame(self) -> pd.DataFrame:
        raise ConfigError("`rec group` needs one vector per user, and inline vectors are per row. Fix: write the "
                          "user vectors as .npz shards (user_ids, user_emb) and pass that with --cf")


def _shard_pair(arrays: dict, kind: str, f: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, emb (n, d) float32) of one shard, validated (shapes, integer ids >= 0, finite)."""
    if f"{kind}_ids" not in arrays or f"{kind}_emb" not in arrays:
        have = "ids" if f"{kind}_ids" in arrays else "emb"
        raise DataError(f"has {kind}_{have} without its pair", source=str(f), field=f"{kind}_ids",
                        fix=f"write both {kind}_ids (n,) and {kind}_emb (n, d)", reason="cf_bad_file")
    ids, emb = arrays[f"{kind}_ids"], arrays[f"{kind}_emb"]
    if ids.ndim != 1 or emb.ndim != 2 or len(ids) != len(emb) or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{kind}_ids {ids.shape} {ids.dtype} and {kind}_emb {emb.shape} do not pair up",
                        source=str(f), field=f"{kind}_emb", fix=f"{kind}_ids: (n,) integers, {kind}_emb: (n, d)",
                        reason="cf_dim")
    if len(ids) and ids.min() < 0:
        raise DataError(f"negative {kind} id {int(ids.min())}", source=str(f), field=f"{kind}_ids",
                        fix="ids are the split's user_id / item_id values (>= 0)", reason="cf_bad_value")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise DataError(f"{kind} id {int(ids[bad][0])} has a NaN/Inf vector ({int(bad.sum())} such rows)",
                        source=str(f), field=f"{kind}_emb", fix="re-export the embeddings", reason="cf_not_finite")
    return ids.astype(np.int64), emb.astype(np.float32)


def _vector(value, source: str, line: int, name: str, dims: dict) -> np.ndarray:
    """One inline vector (JSON list / array of numbers, or base64 float32 bytes) -> (d,) float32, validated."""
    fix = "store a list of d numbers, or base64 of d little-endian float32 values"
    if isinstance(value, (bytes, str)):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DataError("not valid base64", source=source, line=line, field=name, fix=fix,
                            reason="cf_bad_value") from None
        if len(raw) % 4:
            raise DataError(f"base64 payload of {len(raw)} bytes is not a whole number of float32", source=source,
                            line=line, field=name, fix=fix, reason="cf_bad_value")
        vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        try:
            vec = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"not a vector: {str(value)[:40]!r}", source=source, line=line, field=name, fix=fix,
                            reason="cf_bad_value") from None
    if vec.ndim != 1 or vec.size == 0:
        raise DataError(f"expected a flat vector, got shape {vec.shape}", source=source, line=line, field=name,
                        fix=fix, reason="cf_dim")
    d = dims.setdefault("d", vec.size)
    if vec.size != d:
        raise DataError(f"dimension {vec.size}, but earlier vectors have {d}", source=source, line=line, field=name,
                        fix="every User_emb / TargetItem_emb / History_embs vector has the same size", reason="cf_dim")
    if not np.isfinite(vec).all():
        raise DataError("NaN or Inf in the vector", source=source, line=line, field=name,
                        fix="re-export the embeddings", reason="cf_not_finite")
    return vec


def _validate(df: pd.DataFrame, check, on_error: str, source: str, lines=None,
              quiet: bool = False) -> tuple[np.ndarray, dict, dict]:
    """Run check(line, row) on every row (line = lines[i], default i + 1); DataError -> raise, or skip-and-count by
    reason (on_error=skip). Returns (kept, {reason: count}, {row index: DataError})."""
    kept = np.ones(len(df), dtype=bool)
    skipped: dict[str, int] = {}
    errors: dict[int, DataError] = {}
    for i, row in enumerate(df.to_dict("records")):
        try:
            check(lines[i] if lines is not None else i + 1, row)
        except DataError as err:
            if on_error != "skip":
                raise
            kept[i] = False
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            errors[i] = err
    if skipped and not quiet:
        log.warning("%s: skipped %d rows whose CF vectors are unusable (data.on_error=skip): %s", source,
                    int((~kept).sum()), skipped)
    return kept, skipped, errors


def check_cf_spec(spec: str, option: str = "task.options.cf_export") -> None:
    """Start-up check of the spec's form (the vectors themselves are validated when rows are read)."""
    if spec == INLINE:
        return
    p = Path(spec)
    if p.is_dir() and ((p / "cf_meta.json").is_file() or any(p.glob("*.npz"))):
        return
    if p.is_file() and p.suffix == ".npz":
        return
    raise ConfigError(f"{option}={spec!r} is neither a `rec train-cf` folder, .npz shards nor `inline`. Fix: "
                      f"{_SPEC_FIX}")


def open_cf_source(spec: str) -> CFSource:
    """The CFSource for a spec (module docstring). Cached per process while its files are unchanged: the samples
    and the wrapper share one (an inline source learns its dimension from the rows it read)."""
    check_cf_spec(spec)
    return _open(str(spec), _stamp(spec))


def _stamp(spec: str) -> tuple:
    """(name, size, mtime) of the files a spec reads: a changed file makes a new cache entry."""
    if spec == INLINE:
        return ()
    p = Path(spec)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@lru_cache(maxsize=4)
def _open(spec: str, stamp: tuple) -> CFSource:
    if spec == INLINE:
        return InlineSource()
    p = Path(spec)
    if p.is_dir() and (p / "cf_meta.json").is_file():
        try:
            return ExportSource(load_cf_export(p))
        except CheckpointError as err:
            raise ConfigError(f"task.options.cf_export={spec!r}: {err}") from None
    return NpzSource(p)
