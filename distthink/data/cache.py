"""The encoded-split cache: the files a split is encoded into once, then read by every rank of every run.

One entry is a directory ``<cache_dir>/<stem>-<key[:16]>/`` (the key: distthink/data/fingerprint.py):

    meta.json          layout version, what was encoded (the fingerprint inputs, readable), counts, the column
                       schema, the weight palette, category tables and the dataset report
    tokens.int32       every token id of the split, sample after sample
    offsets.int64      (n + 1,): sample i is tokens[offsets[i]:offsets[i + 1]]
    codes.uint8        per token, an index into meta.json's palette of the split's distinct (learned, weight)
                       pairs: exact and one byte. A split with more than 255 distinct pairs stores
                       learned.uint8 + weights.float64 instead (meta.json "weights": "wide").
    present.uint64     per sample, bit j: the meta key of column j is present;
    none.uint64        ... and is None
    <col>.<dtype>      per sample: one value (scalar kinds), or for ragged kinds the values of all samples with
    <col>.off.int64    (n + 1,) offsets per sample

Labels are not stored: a label is the token where it is learned, else IGNORE_INDEX (EncodedSample's contract).
The palette keeps `learned` and the weight apart, so a sample comes back exactly as it went in.

Writing. CacheWriter appends EncodedChunks into a temp directory next to the target; publish() fsyncs every
file, writes meta.json last and renames the directory into place (atomic on POSIX). Only a complete entry has
a meta.json under its final name, and readers open nothing else: a crash leaves a ``.tmp-*`` directory that is
never read and that remove_stale_temps() deletes once its writer is gone.

Reading. CachedSplit loads the offsets (the lengths the batch planner needs: 16 bytes per sample) and reads
the rows it is asked for with os.pread. Rows are deliberately not memory-mapped: a page that a process maps
counts in its unique memory (USS) as long as no other process maps it, so a rank that reads half of a mapped
200 MB file grows by ~96 MiB (measured; with pread: 0). Read with pread, rows live in the page cache, shared
by every rank of the node and reclaimable; a rank's own memory is the offsets, whatever the corpus size.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distthink.atomic import fsync_dir, write_text_atomic
from distthink.data.fingerprint import CACHE_FORMAT
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

META_FILE = "meta.json"
TEMP_PREFIX = ".tmp-"

#: kind -> (stored dtype, ragged). Scalar kinds store one value per sample, ragged kinds a 1-D array per sample.
KINDS: dict[str, tuple[str, bool]] = {
    "int": ("int64", False),
    "float": ("float64", False),
    "bool": ("uint8", False),
    "category": ("int32", False),   # a string out of a small set (source path, form): codes, strings in meta.json
    "str": ("uint8", True),         # any string, utf-8
    "json": ("uint8", True),        # any JSON value (small odd meta), utf-8 JSON text
    "ints": ("int64", True),        # list[int]
    "floats": ("float64", True),    # list[float]
    "pairs": ("int64", True),       # list[tuple[int, int]]
}
_INT_KINDS = ("int", "ints", "pairs")
_MAX_COLUMNS = 64  # one bit per column in present/none
_MAX_PALETTE = 255


@dataclass(frozen=True)
class Column:
    """One per-sample meta key stored in the cache: `name` (the meta key), `kind` (KINDS) and, for integer kinds,
    an optional smaller storage `dtype` (e.g. "int32"; values are range-checked when written)."""

    name: str
    kind: str
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"cache column '{self.name}': unknown kind {self.kind!r}. Fix: use one of {sorted(KINDS)}")
        if self.dtype is not None and (self.kind not in _INT_KINDS or np.dtype(self.dtype).kind not in "iu"):
            raise ConfigError(f"cache column '{self.name}': dtype {self.dtype!r} is only for the integer kinds "
                              f"{_INT_KINDS}. Fix: drop it or use an integer dtype")

    @property
    def storage(self) -> np.dtype:
        return np.dtype(self.dtype or KINDS[self.kind][0])

    @property
    def ragged(self) -> bool:
        return KINDS[self.kind][1]

    def file(self) -> str:
        return f"col.{self.name}.{self.storage.name}"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype}


# ----------------------------------------------------------------------------------------------------------
# Samples -> columns (runs in the encoding workers) and back (runs in the reader).

@dataclass
class EncodedChunk:
    """A run of consecutive encoded samples in columnar form: what an encoding worker sends to the writer."""

    lengths: np.ndarray                     # (s,) int64 tokens per sample
    tokens: np.ndarray                      # (T,) int64
    learned: np.ndarray                     # (T,) bool: label != IGNORE_INDEX
    weights: np.ndarray                     # (T,) float64 loss weights
    present: np.ndarray                     # (s,) uint64 bit j: column j's key is in the meta
    none: np.ndarray                        # (s,) uint64 bit j: ... and its value is None
    columns: dict[str, Any] = field(default_factory=dict)  # scalar: (s,) array; ragged: (values, (s,) lengths);
                                                           # category: list[str]


class MetaCodec:
    """Per-sample meta dicts <-> columns, for a fixed tuple of Columns (their order is the bit order)."""

    def __init__(self, columns: Sequence[Column]):
        self.columns = tuple(columns)
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ConfigError(f"cache columns {names} repeat a name. Fix: one Column per meta key")
        if len(names) > _MAX_COLUMNS:
            raise ConfigError(f"{len(names)} cache columns, at most {_MAX_COLUMNS}. Fix: group keys in a `json` column")
        self.bit = {c.name: np.uint64(1) << np.uint64(j) for j, c in enumerate(self.columns)}

    def encode(self, samples: Sequence[EncodedSample]) -> EncodedChunk:
        lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
        tokens = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in samples]) if samples else \
            np.zeros(0, np.int64)
        labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in samples]) if samples else \
            np.zeros(0, np.int64)
        weights = np.concatenate([np.asarray(s.loss_weights, dtype=np.float64) for s in samples]) if samples else \
            np.zeros(0, np.float64)
        present = np.zeros(len(samples), np.uint64)
        none = np.zeros(len(samples), np.uint64)
        known = set(self.bit)
        for i, s in enumerate(samples):
            extra = set(s.meta) - known
            if extra:
                raise ConfigError(f"sample meta key(s) {sorted(extra)} have no cache column. Fix: declare a Column "
                                  "for each in the task's SplitEncoding.columns (or drop them from the meta)")
            for k, v in s.meta.items():
                present[i] |= self.bit[k]
                if v is None:
                    none[i] |= self.bit[k]
        columns = {}
        for c in self.columns:
            values = [s.meta.get(c.name) for s in samples]
            columns[c.name] = _encode_column(c, values)
        return EncodedChunk(lengths, tokens, labels != IGNORE_INDEX, weights, present, none, columns)

    def decode(self, present: int, none: int, read: Callable[[Column], Any]) -> dict:
        """The meta dict of one sample; `read(column)` returns its stored value (scalar or 1-D array)."""
        meta = {}
        for c in self.columns:
            bit = int(self.bit[c.name])
            if not present & bit:
                continue
            meta[c.name] = None if none & bit else _decode_value(c, read(c))
        return meta


def _type_error(c: Column, v: Any) -> ConfigError:
    return ConfigError(f"sample meta '{c.name}' = {v!r} ({type(v).__name__}) does not fit the cache column kind "
                       f"'{c.kind}'. Fix: declare the column with the kind of its values (distthink.data.cache.KINDS)")


def _encode_column(c: Column, values: list) -> Any:
    """Stored form of one column over a chunk; absent or None values store as 0 / empty (see present/none)."""
    if c.kind == "category":
        out = []
        for v in values:
            if v is not None and not isinstance(v, str):
                raise _type_error(c, v)
            out.append(v or "")
        return out
    if not c.ragged:
        arr = np.zeros(len(values), KINDS[c.kind][0])
        for i, v in enumerate(values):
            if v is None:
                continue
            if c.kind == "int":
                if isinstance(v, (bool, np.bool_)):
                    raise _type_error(c, v)
                try:
                    arr[i] = operator.index(v)
                except TypeError:
                    raise _type_error(c, v) from None
            elif c.kind == "float":
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                    raise _type_error(c, v)
                arr[i] = float(v)
            else:
                if not isinstance(v, (bool, np.bool_)):
                    raise _type_error(c, v)
                arr[i] = bool(v)
        return arr
    parts = []
    for v in values:
        if v is None:
            parts.append(np.zeros(0, KINDS[c.kind][0]))
        elif c.kind in ("str", "json"):
            if c.kind == "str" and not isinstance(v, str):
                raise _type_error(c, v)
            text = v if c.kind == "str" else json.dumps(v, separators=(",", ":"))
            parts.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
        else:
            arr = np.asarray(v)
            if arr.size == 0:
                arr = np.zeros(0, KINDS[c.kind][0])
            ok = arr.dtype.kind in ("iu" if c.kind in _INT_KINDS else "iuf")
            shape_ok = arr.ndim == 1 if c.kind != "pairs" else (arr.ndim == 2 and arr.shape[1] == 2) or arr.size == 0
            if not ok or not shape_ok:
                raise _type_error(c, v)
            parts.append(arr.reshape(-1).astype(KINDS[c.kind][0]))
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    values_arr = np.concatenate(parts) if parts else np.zeros(0, KINDS[c.kind][0])
    return values_arr, lengths


def _decode_value(c: Column, raw: Any) -> Any:
    kind = c.kind
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return bool(raw)
    if kind == "category":
        return raw  # already the string (the reader maps codes)
    if kind == "str":
        return raw.tobytes().decode("utf-8")
    if kind == "json":
        return json.loads(raw.tobytes().decode("utf-8"))
    if kind == "ints":
        return raw.astype(np.int64).tolist()
    if kind == "floats":
        return raw.astype(np.float64).tolist()
    return [tuple(p) for p in raw.astype(np.int64).reshape(-1, 2).tolist()]  # pairs


def _fit(c: Column, arr: np.ndarray) -> np.ndarray:
    """`arr` in the column's storage dtype, refusing values that do not fit (never a silent wrap-around)."""
    dt = c.storage
    if arr.size and dt.kind in "iu" and dt != arr.dtype:
        info = np.iinfo(dt)
        if arr.min() < info.min or arr.max() > info.max:
            raise ConfigError(f"cache column '{c.name}' holds values outside {dt.name} ({arr.min()}..{arr.max()}). "
                              "Fix: declare a wider dtype for it")
    return arr.astype(dt, copy=False)


# ----------------------------------------------------------------------------------------------------------
# Writing.

def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


class CacheWriter:
    """Append EncodedChunks in order into a temp directory of `cache_dir`; publish() makes it the entry `name`."""

    def __init__(self, cache_dir: Path, name: str, codec: MetaCodec):
        self.cache_dir, self.name, self.codec = Path(cache_dir), name, codec
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.cache_dir / f"{TEMP_PREFIX}{name}-{socket.gethostname()}-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        write_text_atomic(self.tmp / "owner.json", json.dumps(_owner()))
        self._files: dict[str, Any] = {}
        self.samples = self.tokens = 0
        self.palette: dict[tuple[bool, int], int] = {}
        self.wide = False
        self.categories: dict[str, dict[str, int]] = {c.name: {} for c in codec.columns if c.kind == "category"}
        self.ragged_total = {c.name: 0 for c in codec.columns if c.ragged}
        for fname in ("tokens.int32", "codes.uint8", "present.uint64", "none.uint64"):  # exist even when empty
            self._append(fname, np.zeros(0, np.uint8))
        self._append("offsets.int64", np.zeros(1, np.int64))
        for c in codec.columns:
            self._append(c.file(), np.zeros(0, np.uint8))
            if c.ragged:
                self._append(f"{c.file()}.off.int64", np.zeros(1, np.int64))

    def _append(self, fname: str, arr: np.ndarray) -> None:
        fh = self._files.get(fname)
        if fh is None:
            fh = self._files[fname] = open(self.tmp / fname, "ab")
        fh.write(np.ascontiguousarray(arr).tobytes())

    def add(self, chunk: EncodedChunk) -> None:
        if chunk.tokens.size and (chunk.tokens.min() < 0 or chunk.tokens.max() > np.iinfo(np.int32).max):
            raise ConfigError("token ids outside 0..2^31-1 cannot be cached as int32. Fix: report it; no known "
                              "tokenizer has such ids")
        self._append("tokens.int32", chunk.tokens.astype(np.int32))
        self._add_weights(chunk.learned, chunk.weights)
        self._append("offsets.int64", self.tokens + np.cumsum(chunk.lengths))
        self._append("present.uint64", chunk.present)
        self._append("none.uint64", chunk.none)
        for c in self.codec.columns:
            data = chunk.columns[c.name]
            if c.kind == "category":
                table = self.categories[c.name]
                codes = np.fromiter((table.setdefault(v, len(table)) for v in data), np.int32, count=len(data))
                self._append(c.file(), codes)
            elif c.ragged:
                values, lengths = data
                self._append(c.file(), _fit(c, values))
                self._append(f"{c.file()}.off.int64", self.ragged_total[c.name] + np.cumsum(lengths))
                self.ragged_total[c.name] += int(lengths.sum())
            else:
                self._append(c.file(), _fit(c, data))
        self.samples += len(chunk.lengths)
        self.tokens += int(chunk.lengths.sum())

    def _add_weights(self, learned: np.ndarray, weights: np.ndarray) -> None:
        if not self.wide:
            codes = self._palette_codes(learned, weights)
            if codes is not None:
                self._append("codes.uint8", codes)
                return
            self._widen()
        self._append("learned.uint8", learned.astype(np.uint8))
        self._append("weights.float64", weights.astype(np.float64))

    def _palette_codes(self, learned: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """uint8 codes of (learned, weight) pairs (weights compared bit for bit), or None past 255 pairs."""
        bits = weights.astype(np.float64).view(np.int64)
        codes = np.empty(len(bits), np.uint8)
        for flag in (False, True):
            sel = learned == flag
            uniq, inverse = np.unique(bits[sel], return_inverse=True)
            lut = np.empty(len(uniq), np.uint8)
            for j, b in enumerate(uniq.tolist()):
                code = self.palette.get((flag, b))
                if code is None:
                    if len(self.palette) >= _MAX_PALETTE:
                        return None
                    code = self.palette[(flag, b)] = len(self.palette)
                lut[j] = code
            codes[sel] = lut[inverse.reshape(-1)]
        return codes

    def _widen(self) -> None:
        """More than 255 distinct (learned, weight) pairs: rewrite the codes as learned.uint8 + weights.float64."""
        pal_learned, pal_weight = _palette_arrays(self.palette_list())
        self._append("learned.uint8", np.zeros(0, np.uint8))
        self._append("weights.float64", np.zeros(0, np.float64))
        fh = self._files.pop("codes.uint8", None)
        if fh is not None:
            fh.close()
            path = self.tmp / "codes.uint8"
            with open(path, "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    codes = np.frombuffer(block, np.uint8)
                    self._append("learned.uint8", pal_learned[codes].astype(np.uint8))
                    self._append("weights.float64", pal_weight[codes])
            path.unlink()
        self.wide = True
        log.info("%s: more than %d distinct token weights: weights stored as float64 (9 bytes/token instead of 5)",
                 self.name, _MAX_PALETTE)

    def palette_list(self) -> list[list]:
        """[[learned, weight], ...] in code order (weights as exact float64)."""
        out: list[list] = [[False, 0.0]] * len(self.palette)
        for (flag, b), code in self.palette.items():
            out[code] = [flag, float(np.int64(b).view(np.float64))]
        return out

    def publish(self, final: Path, meta: dict) -> Path:
        """fsync everything, write meta.json last, rename the temp directory to `final` (atomic). When another
        writer published the same entry first, ours is dropped and theirs is used: same key, same content."""
        for fh in self._files.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        self._files.clear()
        (self.tmp / "owner.json").unlink(missing_ok=True)
        meta = dict(meta, format=CACHE_FORMAT, samples=self.samples, tokens=self.tokens,
                    weights="wide" if self.wide else "palette", palette=self.palette_list(),
                    columns=[c.to_json() for c in self.codec.columns],
                    categories={k: list(v) for k, v in self.categories.items()}, ragged_total=self.ragged_total)
        meta["bytes"] = sum(p.stat().st_size for p in self.tmp.iterdir())
        write_text_atomic(self.tmp / META_FILE, json.dumps(meta, indent=1))
        fsync_dir(self.tmp)
        try:
            os.rename(self.tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
            log.info("%s was published by another writer meanwhile; using it", final)
        fsync_dir(final.parent)
        return final

    def abort(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _palette_arrays(palette: list) -> tuple[np.ndarray, np.ndarray]:
    learned = np.array([bool(p[0]) for p in palette] or [False], dtype=bool)
    weight = np.array([float(p[1]) for p in palette] or [0.0], dtype=np.float64)
    return learned, weight


def is_complete(entry: Path) -> bool:
    return (Path(entry) / META_FILE).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(cache_dir: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Delete the temp directories of writers that are gone: their process no longer exists on this host, or
    (written from another host) nothing in them changed for `max_age_s`. Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for tmp in Path(cache_dir).glob(f"{TEMP_PREFIX}*"):
        if not tmp.is_dir():
            continue
        try:
            owner = json.loads((tmp / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        try:
            newest = max([p.stat().st_mtime for p in tmp.iterdir()] + [tmp.stat().st_mtime])
        except OSError:
            continue
        pid = owner.get("pid")
        dead = owner.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)
        if dead or time.time() - newest > max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d unfinished cache write(s) of crashed runs in %s", len(removed), cache_dir)
    return removed


# ----------------------------------------------------------------------------------------------------------
# Reading.

class CachedSplit(Sequence):
    """A cached split as a sequence of EncodedSamples, built on demand (see the module docstring).

    - ``lengths``: (n,) int64 tokens per sample, all the batch planner reads;
    - ``split[i]``: EncodedSample i (lists, like the in-memory encoders return, `meta` as the encoder wrote it);
    - ``split[i] = sample``: replace sample i in this process only (on-policy tasks regenerate samples);
    - ``meta``: meta.json (what was encoded, counts, the report); ``nbytes``: size on disk.
    """

    def __init__(self, path: str | Path, unpack: Callable[[dict], dict] | None = None):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META_FILE).read_text())
        except (OSError, ValueError) as err:
            raise _corrupt(self.path, f"meta.json unreadable ({err})") from None
        if self.meta.get("format") != CACHE_FORMAT:
            raise _corrupt(self.path, f"layout version {self.meta.get('format')} (this distthink reads {CACHE_FORMAT})")
        self.unpack = unpack
        self.codec = MetaCodec([Column(**c) for c in self.meta["columns"]])
        n, t = int(self.meta["samples"]), int(self.meta["tokens"])
        self.offsets = np.fromfile(self.path / "offsets.int64", dtype=np.int64)
        if len(self.offsets) != n + 1 or int(self.offsets[-1]) != t:
            raise _corrupt(self.path, "offsets.int64 does not match meta.json")
        self.lengths = np.diff(self.offsets)
        self.wide = self.meta["weights"] == "wide"
        self._pal_learned, self._pal_weight = _palette_arrays(self.meta["palette"])
        self._tables = {k: list(v) for k, v in self.meta["categories"].items()}
        self._fds: dict[str, int] = {}
        expect = {"tokens.int32": 4 * t, "present.uint64": 8 * n, "none.uint64": 8 * n}
        expect.update({"learned.uint8": t, "weights.float64": 8 * t} if self.wide else {"codes.uint8": t})
        for c in self.codec.columns:
            if c.ragged:
                expect[c.file()] = c.storage.itemsize * int(self.meta["ragged_total"][c.name])
                expect[f"{c.file()}.off.int64"] = 8 * (n + 1)
            else:
                expect[c.file()] = c.storage.itemsize * n
        for fname, size in expect.items():
            p = self.path / fname
            if not p.is_file() or p.stat().st_size != size:
                self.close()
                raise _corrupt(self.path, f"{fname} is missing or has the wrong size")
            self._fds[fname] = os.open(p, os.O_RDONLY)
        self._overrides: dict[int, EncodedSample] = {}

    # -- sequence ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a split of {len(self)}")
        hit = self._overrides.get(i)
        return hit if hit is not None else self._sample(i)

    def __setitem__(self, i: int, sample: EncodedSample) -> None:
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a split of {len(self)}")
        self._overrides[i] = sample

    # -- rows ----------------------------------------------------------------------------------------
    def _read(self, fname: str, dtype, start: int, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = count * dt.itemsize
        buf = os.pread(self._fds[fname], nbytes, start * dt.itemsize) if nbytes else b""
        if len(buf) != nbytes:
            raise _corrupt(self.path, f"short read in {fname}")
        return np.frombuffer(buf, dtype=dt)

    def _sample(self, i: int) -> EncodedSample:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self._read("tokens.int32", np.int32, a, b - a).astype(np.int64)
        if self.wide:
            learned = self._read("learned.uint8", np.uint8, a, b - a).astype(bool)
            weights = self._read("weights.float64", np.float64, a, b - a)
        else:
            codes = self._read("codes.uint8", np.uint8, a, b - a)
            learned, weights = self._pal_learned[codes], self._pal_weight[codes]
        labels = np.where(learned, ids, IGNORE_INDEX)
        meta = self.sample_meta(i)
        return EncodedSample(input_ids=ids.tolist(), labels=labels.tolist(), loss_weights=weights.tolist(), meta=meta)

    def sample_meta(self, i: int) -> dict:
        """The meta of sample i alone (no token is read)."""
        present = int(self._read("present.uint64", np.uint64, i, 1)[0])
        none = int(self._read("none.uint64", np.uint64, i, 1)[0])

        def read(c: Column):
            if c.kind == "category":
                return self._tables[c.name][int(self._read(c.file(), np.int32, i, 1)[0])]
            if not c.ragged:
                return self._read(c.file(), c.storage, i, 1)[0]
            lo, hi = self._read(f"{c.file()}.off.int64", np.int64, i, 2).tolist()
            return self._read(c.file(), c.storage, lo, hi - lo)

        meta = self.codec.decode(present, none, read)
        return self.unpack(meta) if self.unpack is not None else meta

    def column(self, name: str) -> np.ndarray:
        """All values of a scalar column at once (category columns: their strings), e.g. for counts."""
        c = next((c for c in self.codec.columns if c.name == name), None)
        if c is None or c.ragged:
            raise KeyError(f"no scalar cache column '{name}'")
        values = np.fromfile(self.path / c.file(), dtype=c.storage)
        return np.asarray(self._tables[name], dtype=object)[values] if c.kind == "category" else values

    @property
    def nbytes(self) -> int:
        return int(self.meta.get("bytes", 0))

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down `os` already
            pass

    def __repr__(self) -> str:
        return f"CachedSplit({self.path}, {len(self)} samples, {self.meta['tokens']} tokens)"


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"the cache entry is incomplete or damaged: {what}", source=str(path), reason="cache_corrupt",
                     fix=f"delete {path} (the next run or `distthink prepare` encodes it again)")
