"""Encode a split into the cache (distthink/data/cache.py), in parallel, streaming.

    inputs, key = encoding_key(encoding, tokenizer, cache_dir)
    path = build_split(encoding, tokenizer, cache_dir, entry_name(encoding, key), inputs=inputs, num_proc=8)

- Streaming: records are read one by one (JSONL/.gz by line, Parquet by batch, `datasets` folders by row) and at
  most 2 x num_proc chunks of CHUNK_RECORDS records are in flight, so a source larger than memory encodes in
  constant memory.
- Order: samples are written in record order whatever the number of workers, so the cache equals the in-memory
  encoding sample for sample.
- Errors: a DataError raised by the encoder for one record is counted by reason (on_error=skip) or stops the
  build (on_error=raise; it names the file and line). Any other error, and any error raised while *reading* the
  records, stops the build. A stopped build leaves no entry.
- The report (records, samples, tokens, learned tokens, truncations, skips with their first example) and the label
  audit's count are computed here and stored in meta.json: a cached start prints the same report.
- Workers are forked where the platform can (the tokenizer is inherited, nothing is imported again; torch's
  DataLoader does the same), else spawned (the encoder and tokenizer are pickled once per worker). Each worker
  restores the default SIGTERM/SIGUSR1 handling (the trainer's preemption flag must not keep it alive), ignores
  SIGINT (the writer stops the pool) and runs with TOKENIZERS_PARALLELISM=false (it is one process of a pool).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from distthink.data.cache import CacheWriter, Column, EncodedChunk, MetaCodec
from distthink.data.chat import META_COLUMNS, ChatPolicy
from distthink.data.dataset import BadJSON, DatasetReport
from distthink.data.fingerprint import (
    CACHE_FORMAT,
    ENCODER_MODULES,
    chat_template_digest,
    code_digest,
    fingerprint,
    source_digest,
    tokenizer_digest,
)
from distthink.data.types import EncodedSample
from distthink.engine import faults
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

# Small chunks keep the workers busy to the end: on a 0.4 M-token corpus, 2 processes ran 1.54x as fast as one
# with 64 records per chunk and 1.7x with 16.
CHUNK_RECORDS = 16
#: Policy fields that decide nothing about the encoding (only whether the label audit refuses the split).
POLICY_NOT_ENCODING = ("allow_full_sequence_loss",)

Encoder = Callable[[Any, str, int, Any], "tuple[list[EncodedSample], list[DataError]]"]


@dataclass
class SplitEncoding:
    """How one split of a task becomes a cache entry (a task returns it from `split_encoding`).

    sources:  the files / folders / dataset names the records come from; their content keys the entry.
    records:  () -> iterable of (source, line, record), streaming; runs in the writing process only.
    encoder:  (tokenizer, source, line, record) -> (samples, skipped DataErrors); a DataError raised for the record
              skips or stops per on_error. Must be picklable (a module-level function or an instance of a
              module-level class): it runs in worker processes.
    policy:   the ChatPolicy (keys the entry; its allow_full_sequence_loss drives the label audit).
    columns:  the meta keys of the samples, with their kinds (distthink/data/cache.py); default: encode_chat's.
    options:  task options that change the encoding (they key the entry); nothing else belongs here.
    code:     modules whose source the encoder runs beyond the chat encoder's (they key the entry).
    limit:    encode only the first `limit` records (None: all).
    pack / unpack: meta -> storable meta (in the workers) and back (when a sample is read), for meta the column
              kinds cannot hold as they are (the molecule task's graphs). Picklable like `encoder`.
    stem:     readable start of the entry's directory name (default: the first source's file stem).
    describe: optional (opened split) -> one line the engine logs after the report (e.g. counts of a column).
    """

    sources: list[str]
    records: Callable[[], Iterable[tuple[str, int, Any]]]
    encoder: Encoder
    policy: ChatPolicy
    columns: tuple[Column, ...] = META_COLUMNS
    options: dict = field(default_factory=dict)
    code: tuple[str, ...] = ()
    limit: int | None = None
    pack: Callable[[dict], dict] | None = None
    unpack: Callable[[dict], dict] | None = None
    stem: str = ""
    describe: Callable[[Any], str] | None = None


def _modules_of(*objs) -> tuple[str, ...]:
    out = []
    for obj in objs:
        if obj is None:
            continue
        for name in (getattr(obj, "__module__", None), type(obj).__module__):
            if name and name not in ("builtins", "functools") and name not in out:
                out.append(name)
    return tuple(out)


def encoding_key(enc: SplitEncoding, tokenizer, memo_dir: Path | None = None) -> tuple[dict, str]:
    """(the readable encoding inputs, their fingerprint): what keys the entry (distthink/data/fingerprint.py)."""
    policy = {k: v for k, v in asdict(enc.policy).items() if k not in POLICY_NOT_ENCODING}
    code = list(ENCODER_MODULES)
    code += [m for m in (*enc.code, *_modules_of(enc.encoder, enc.pack, enc.unpack)) if m not in code]
    inputs = {"format": CACHE_FORMAT,
              "sources": [source_digest(s, memo_dir) for s in enc.sources],
              "limit": enc.limit,
              "tokenizer": tokenizer_digest(tokenizer),
              "chat_template": chat_template_digest(tokenizer),
              "policy": policy,
              "options": enc.options,
              "columns": [c.to_json() for c in enc.columns],
              "code": {"modules": code, "sha256": code_digest(code)}}
    return inputs, fingerprint(inputs)


def entry_name(enc: SplitEncoding, key: str) -> str:
    stem = enc.stem or (Path(str(enc.sources[0])).name.split(".")[0] if enc.sources else "records")
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem)[:48] or "split"
    return f"{safe}-{key[:16]}"


# ----------------------------------------------------------------------------------------------------------
# Workers.

@dataclass
class _ChunkResult:
    chunk: EncodedChunk
    report: DatasetReport
    error: DataError | None = None


_STATE: dict[str, Any] = {}


def _init_worker(tokenizer, encoder, codec: MetaCodec, pack, on_error: str, in_pool: bool) -> None:
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _STATE.update(tokenizer=tokenizer, encoder=encoder, codec=codec, pack=pack, on_error=on_error)


def _encode_chunk(items: list[tuple[str, int, Any]]) -> _ChunkResult:
    st = _STATE
    report = DatasetReport(source="")
    samples: list[EncodedSample] = []
    error = None
    for src, line, rec in items:
        report.records += 1
        try:
            if isinstance(rec, BadJSON):
                raise DataError(f"invalid JSON ({rec.msg})", source=src, line=line, reason="invalid_json",
                                fix="write one JSON object per line")
            got, turn_skips = st["encoder"](st["tokenizer"], src, line, rec)
        except DataError as err:
            if st["on_error"] == "raise":
                error = err
                break
            report.add_skip(err)
            continue
        if turn_skips and st["on_error"] == "raise":
            error = turn_skips[0]
            break
        for err in turn_skips:
            report.add_skip(err)
        for s in got:
            report.add_sample(s)
            if st["pack"] is not None:
                s = EncodedSample(s.input_ids, s.labels, s.loss_weights, st["pack"](s.meta))
            samples.append(s)
    return _ChunkResult(st["codec"].encode(samples), report, error)


def _chunks(records: Iterable, size: int) -> Iterator[list]:
    it = iter(records)
    while True:
        block = list(itertools.islice(it, size))
        if not block:
            return
        yield block


def _encoded(chunks: Iterator[list], num_proc: int, init_args: tuple) -> Iterator[_ChunkResult]:
    """Encoded chunks in input order: in this process (num_proc 1) or by a pool with a bounded window."""
    if num_proc <= 1:
        _init_worker(*init_args, in_pool=False)
        try:
            for block in chunks:
                yield _encode_chunk(block)
        finally:
            _STATE.clear()
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # read at fork time by tokenizers' fork guard
    with mp.get_context(method).Pool(num_proc, initializer=_init_worker, initargs=(*init_args, True)) as pool:
        pending: deque = deque()
        for block in chunks:
            pending.append(pool.apply_async(_encode_chunk, (block,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------------------
# The build.

def build_split(enc: SplitEncoding, tokenizer, cache_dir: Path, name: str, *, inputs: dict, num_proc: int = 1,
                on_error: str = "raise", label: str = "split", progress: bool = True,
                on_progress: Callable[[dict], None] | None = None) -> Path:
    """Encode `enc` into the entry `cache_dir/name` (atomically; see distthink/data/cache.py). Returns its path.

    num_proc: worker processes (1 = in this process). on_progress(dict) is called every few seconds with
    records/samples/tokens so far (the engine shows it to the ranks that wait)."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}. Fix: use 'raise' or 'skip'")
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    codec = MetaCodec(enc.columns)
    writer = CacheWriter(cache_dir, name, codec)
    report = DatasetReport(source=", ".join(str(s) for s in enc.sources) or "<records>")
    t0 = last = time.time()
    bar = tqdm(desc=f"encode {label}", unit=" records", disable=not progress, dynamic_ncols=True)
    try:
        records = itertools.islice(enc.records(), enc.limit)
        init_args = (tokenizer, enc.encoder, codec, enc.pack, on_error)
        with closing(_encoded(_chunks(records, CHUNK_RECORDS), max(1, num_proc), init_args)) as results:
            for n, res in enumerate(results, start=1):
                if res.error is not None:
                    raise res.error
                writer.add(res.chunk)
                report.merge(res.report)
                faults.kill_during_encode(n)
                bar.update(res.report.records)
                bar.set_postfix(samples=report.samples, tokens=f"{report.tokens / 1e6:.1f}M", refresh=False)
                if on_progress is not None and time.time() - last > 5:
                    last = time.time()
                    on_progress({"records": report.records, "samples": report.samples, "tokens": report.tokens,
                                 "elapsed_s": round(last - t0, 1)})
        seconds = time.time() - t0
        meta = {"key": fingerprint(inputs), "inputs": inputs, "label": label,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created_unix": time.time(),
                "encode_s": round(seconds, 3),
                "num_proc": max(1, num_proc), "report": report.to_dict(with_examples=True)}
        path = writer.publish(final, meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    log.info("encoded %s in %.1f s with %d process(es): %d samples, %d tokens (%.0f tokens/s) -> %s", label, seconds,
             max(1, num_proc), report.samples, report.tokens, report.tokens / max(seconds, 1e-9), path)
    return path
