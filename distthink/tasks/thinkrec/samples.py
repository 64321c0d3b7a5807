"""ThinkRec rows -> encoded samples (reasoning or label-only answers) and the collator of their side inputs.

See distthink/tasks/thinkrec/task.py for how a row becomes a sample and what the side inputs feed.

Two ways to a split: `split_encoding` (training and `rec eval`: streamed into the encoded-data cache, rows read
batch by batch, encoded in parallel) and `build_samples` (the whole split in memory through pandas: small
splits and tests). Both encode each row with `_encode_row` and draw the same reasoning rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from distthink.data.cache import Column
from distthink.data.chat import META_COLUMNS, encode_chat
from distthink.data.dataset import iter_records
from distthink.data.packing import PackingCollator
from distthink.data.parallel_encode import SplitEncoding
from distthink.data.types import IGNORE_INDEX
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.cf_source import open_cf_source
from distthink.tasks.thinkrec.options import ThinkRecOptions
from distthink.tasks.thinkrec.prepare import read_split

log = get_logger(__name__)


SPLIT_SEED = {"train": 0, "eval": 1, "test": 2}

#: encode_chat's meta plus the ThinkRec side inputs (the collator reads them; rec eval reads index/user/item/label).
COLUMNS = META_COLUMNS + (
    Column("rec_type", "category"), Column("label", "int"), Column("user_id", "int"), Column("item_id", "int"),
    Column("history_ids", "ints"), Column("answer_row", "int"), Column("lm_mult", "float"),
    Column("rec_coef", "float"), Column("index", "int"),
    # per-row CF vectors (cf_source.py; absent when the tables are looked up by id): float32 values stored exactly
    # as float64; cf_hist is flattened (h, d) -> h*d, d = len(cf_user)
    Column("cf_user", "floats"), Column("cf_target", "floats"), Column("cf_hist", "floats"),
)
#: Rows validated against the CF source at once while streaming: the SASRec / DCN / DIN encoders run per chunk.
CF_CHUNK_ROWS = 1024


def verdict_ids(tokenizer, opt: ThinkRecOptions) -> tuple[int, int]:
    """First token id of yes_text and of no_text (distinct, else ConfigError)."""
    y = tokenizer.encode(opt.yes_text, add_special_tokens=False)
    n = tokenizer.encode(opt.no_text, add_special_tokens=False)
    if not y or not n or y[0] == n[0]:
        raise ConfigError(f"the first tokens of yes_text={opt.yes_text!r} ({y[:1]}) and no_text={opt.no_text!r} "
                          f"({n[:1]}) must exist and differ. Fix: choose other verdict words")
    return int(y[0]), int(n[0])


def _encode_row(tokenizer, row: dict, opt: ThinkRecOptions, policy, reasoning: bool, ids: dict, yes_no,
                source: str, line: int, history_ids: bool = True):
    label = int(row["label"])
    answer = str(row["reason"]).strip() if reasoning else (opt.yes_text if label else opt.no_text)
    want = opt.yes_text if label else opt.no_text
    if not answer.startswith(want):
        raise DataError(f"the reason does not start with the verdict {want!r}: {answer[:40]!r}", source=source,
                        line=line, field="reason", fix="store reasons as 'Yes. because ...' / 'No. because ...'")
    r = prompts.render(row, template=opt.template, mode=opt.prompt_mode, answer=answer, source=source, line=line,
                       history_ids=history_ids)
    if opt.proj_token_num > 1:  # k tokens per id: repeat every id token k times
        for tok in prompts.ID_TOKENS:
            r.messages[0]["content"] = r.messages[0]["content"].replace(tok, tok * opt.proj_token_num)
    s = encode_chat(tokenizer, r.messages, policy=policy, source=source, line=line)
    if isinstance(s, list):
        raise ConfigError("data.policy.expand_turns must be false for thinkrec. Fix: remove it")
    arr = np.asarray(s.input_ids)
    learned = np.nonzero(np.asarray(s.labels) != IGNORE_INDEX)[0]
    vid = yes_no[0] if label else yes_no[1]
    hits = learned[np.isin(arr[learned], yes_no)]
    if not hits.size or arr[hits[0]] != vid or hits[0] == 0:
        raise DataError("the answer's verdict token is not in the encoded sample (truncated, or the tokenizer "
                        "merges it with the text before it)", source=source, line=line, field="label",
                        fix="raise data.max_length, or set task.options.yes_text/no_text")
    k = opt.proj_token_num
    expect = {ids[prompts.USER_ID]: k if opt.prompt_mode == "ids" else 0,
              ids[prompts.TARGET_ITEM_ID]: k if opt.prompt_mode == "ids" else 0,
              ids[prompts.ITEM_ID]: k * len(r.history_ids)}
    for tid, n in expect.items():
        found = int((arr == tid).sum())
        if found != n:
            raise DataError(f"sample has {found} placeholder token(s) id {tid} but {n} are needed (truncated?)",
                            source=source, line=line, field="history_item_ids",
                            fix="raise data.max_length or shorten the history")
    s.meta.update(rec_type="reasoning" if reasoning else "label", label=label, user_id=r.user_id,
                  item_id=r.item_id, history_ids=r.history_ids, answer_row=int(hits[0]) - 1,
                  lm_mult=float(opt.beta if reasoning else opt.gamma),
                  rec_coef=float(opt.alpha if reasoning else opt.theta), index=line - 1)
    return s


def build_samples(tokenizer, path: str | Path, opt: ThinkRecOptions, policy, *, seed: int, split: str,
                  reason_ratio: float | None = None, limit: int | None = None, on_error: str = "raise") -> list:
    """Encode a prepared split into EncodedSamples with ThinkRec meta (see the module docstring).

    prompt_mode=ids: the rows are checked against the CF source (distthink/tasks/thinkrec/cf_source.py); rows whose
    vectors are unusable raise, or are skipped and counted with on_error="skip". Per-row vectors (SASRec / DCN /
    DIN user vectors, inline vectors) travel in meta (``cf_user``, ``cf_target``, ``cf_hist``)."""
    df = read_split(path)
    if limit is not None:
        df = df.iloc[:limit]
    ratio = opt.reason_ratio if reason_ratio is None else reason_ratio
    has_reason = (df["reason"].fillna("").astype(str).str.strip() != "").to_numpy() if "reason" in df else \
        np.zeros(len(df), dtype=bool)
    u = np.random.default_rng([seed, SPLIT_SEED.get(split, 3)]).random(len(df))
    reasoning = has_reason & (u < ratio)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    yes_no = verdict_ids(tokenizer, opt)
    rows = df.to_dict("records")
    vec = None
    if opt.prompt_mode == "ids":
        vec = open_cf_source(opt.cf_export).rows(df, source=str(path), on_error=on_error)
    kept = np.nonzero(vec.kept)[0] if vec is not None else np.arange(len(rows))
    out = []
    for j, i in enumerate(kept):
        s = _encode_row(tokenizer, rows[i], opt, policy, bool(reasoning[i]), ids, yes_no, str(path), int(i) + 1,
                        history_ids=vec is None or vec.history_ids)
        if vec is not None:
            if vec.user is not None:
                s.meta["cf_user"] = vec.user[j]
            if vec.target is not None:
                s.meta["cf_target"] = vec.target[j]
                s.meta["cf_hist"] = vec.history[j]  # (0, d) when the rows carry no History_embs
        out.append(s)
    n_reason = int(reasoning[kept].sum())
    log.info("thinkrec %s split %s: %d samples (%d reasoning, %d label-only)%s", split, path, len(out), n_reason,
             len(out) - n_reason, f", {len(rows) - len(out)} rows skipped" if len(out) < len(rows) else "")
    return out


class ThinkRecEncoder:
    """One prepared row -> one sample (picklable: it runs in the cache's encoding workers). The record is
    (row, reasoning, cf): whether the row is a reasoning sample is drawn by the reader (`split_records`), and so are
    its CF vectors: None (no CF source, or tables looked up by id), a dict of per-row vectors (+ "history_ids"), or
    the DataError that makes the row unusable (skipped and counted, or raised, per data.on_error)."""

    def __init__(self, opt: ThinkRecOptions, policy, ids: dict, yes_no: tuple[int, int]):
        self.opt, self.policy, self.ids, self.yes_no = opt, policy, ids, yes_no

    def __call__(self, tokenizer, source: str, line: int, record) -> tuple[list, list]:
        row, reasoning, cf = record
        if isinstance(cf, DataError):
            raise cf
        cf = dict(cf or {})
        history_ids = cf.pop("history_ids", True)
        s = _encode_row(tokenizer, row, self.opt, self.policy, reasoning, self.ids, self.yes_no, source, line,
                        history_ids=history_ids)
        s.meta.update(cf)
        return [s], []


def pack_vectors(meta: dict) -> dict:
    """Sample meta -> storable: the (h, d) history vectors flattened (the cache's floats are 1-D)."""
    if "cf_hist" in meta:
        meta = {**meta, "cf_hist": np.asarray(meta["cf_hist"]).reshape(-1)}
    return meta


def unpack_vectors(meta: dict) -> dict:
    """Stored meta -> what build_samples gives: float32 arrays, cf_hist as (h, d)."""
    for key in ("cf_user", "cf_target"):
        if key in meta:
            meta[key] = np.asarray(meta[key], dtype=np.float32)
    if "cf_hist" in meta:
        meta["cf_hist"] = np.asarray(meta["cf_hist"], dtype=np.float32).reshape(-1, meta["cf_user"].shape[0])
    return meta


def _has_reason(row: dict) -> bool:
    """What build_samples' pandas test computes: a non-null reason that is not blank."""
    reason = row.get("reason")
    return reason is not None and not (isinstance(reason, float) and np.isnan(reason)) and str(reason).strip() != ""


def split_records(path: str | Path, *, seed: int, split: str, ratio: float, cf_spec: str | None = None):
    """Stream (source, row number, (row, reasoning, cf)) of a prepared split: row i is a reasoning sample iff it
    has a reason and u_i < ratio, u = default_rng([seed, split]).random(n) drawn in row order (the same draws as
    build_samples makes for the whole split at once). With a CF source (`cf_spec`, prompt_mode=ids) the rows are
    validated against it CF_CHUNK_ROWS at a time and carry their per-row vectors (see ThinkRecEncoder)."""
    rng = np.random.default_rng([seed, SPLIT_SEED.get(split, 3)])
    src = str(path)
    source = open_cf_source(cf_spec) if cf_spec else None
    chunk: list[tuple[int, Any, bool]] = []
    for i, (_src, _line, row) in enumerate(iter_records(path), start=1):
        u = rng.random()
        if not isinstance(row, dict):  # a line that is not JSON: the encoder's loop counts or raises it
            if source is None:
                yield src, i, row
            else:
                chunk.append((i, row, False))
            continue
        reasoning = _has_reason(row) and u < ratio
        if source is None:
            yield src, i, (row, reasoning, None)
            continue
        chunk.append((i, row, reasoning))
        if len(chunk) >= CF_CHUNK_ROWS:
            yield from _with_vectors(source, src, chunk)
            chunk = []
    if chunk:
        yield from _with_vectors(source, src, chunk)


def _with_vectors(source, src: str, chunk: list):
    """The records of one chunk with their CF vectors (or the DataError of an unusable row), in row order."""
    rows = [(line, row, reasoning) for line, row, reasoning in chunk if isinstance(row, dict)]
    vec = None
    if rows:
        frame = pd.DataFrame([row for _, row, _ in rows])
        vec = source.rows(frame, source=src, on_error="skip", lines=[line for line, _, _ in rows], quiet=True)
    kept_pos = {k: j for j, k in enumerate(np.nonzero(vec.kept)[0])} if vec is not None else {}
    k = 0
    for line, row, reasoning in chunk:
        if not isinstance(row, dict):
            yield src, line, row
            continue
        err = vec.errors.get(k)
        if err is not None:
            yield src, line, (row, reasoning, err)
        else:
            j = kept_pos[k]
            cf: dict[str, Any] = {"history_ids": vec.history_ids}
            if vec.user is not None:
                cf["cf_user"] = vec.user[j]
            if vec.target is not None:
                cf["cf_target"] = vec.target[j]
                cf["cf_hist"] = vec.history[j]  # (0, d) when the rows carry no History_embs
            yield src, line, (row, reasoning, cf)
        k += 1


def split_encoding(tokenizer, path: str | Path, opt: ThinkRecOptions, policy, *, seed: int, split: str,
                   reason_ratio: float | None = None, limit: int | None = None) -> SplitEncoding:
    """How a prepared split is encoded into the cache (see the module docstring)."""
    if not Path(path).is_file():
        raise DataError("prepared split not found", source=str(path),
                        fix="run `distthink rec prepare` first and pass its output folder", reason="missing_file")
    ratio = opt.reason_ratio if reason_ratio is None else reason_ratio
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    yes_no = verdict_ids(tokenizer, opt)
    encoding_options = {"task": "thinkrec", "seed": seed, "split_seed": SPLIT_SEED.get(split, 3),
                        "reason_ratio": ratio, **{k: getattr(opt, k) for k in ENCODING_OPTIONS}}
    cf_spec = opt.cf_export if opt.prompt_mode == "ids" else None
    if cf_spec:
        source = open_cf_source(cf_spec)
        # which rows are kept and their per-row vectors depend on the CF space: its vectors (and encoder weights)
        encoding_options["cf"] = {"spec": str(cf_spec), "fingerprint": source.fingerprint()}
        if not source.dim:  # inline: the projector's input size, known on every rank before the wrapper is built
            source.probe_dim(path)
    return SplitEncoding(sources=[str(path)],
                         records=lambda: split_records(path, seed=seed, split=split, ratio=ratio, cf_spec=cf_spec),
                         encoder=ThinkRecEncoder(opt, policy, ids, yes_no), policy=policy, columns=COLUMNS,
                         options=encoding_options, code=("distthink.tasks.thinkrec.prompts",
                                                         "distthink.tasks.thinkrec.cf_source"),
                         limit=limit, pack=pack_vectors, unpack=unpack_vectors, stem=f"{Path(path).stem}-{split}",
                         describe=_describe)


def _describe(data) -> str:
    kinds = data.column("rec_type")
    n = int((kinds == "reasoning").sum())
    return f"thinkrec: {len(kinds)} samples ({n} reasoning, {len(kinds) - n} label-only)"


#: The options `_encode_row` reads: the only ones that key a split's cache entry.
ENCODING_OPTIONS = ("prompt_mode", "template", "proj_token_num", "yes_text", "no_text", "alpha", "beta", "theta",
                    "gamma")


class ThinkRecCollator:
    """PackingCollator output + ThinkRec side inputs:

    - ``lm_mult`` (B, T) float: the sample's LM mixing weight (beta/gamma) on each of its tokens, 0 on padding;
    - ``rec_rows`` (S,) long: flat index (into B*T) of the row predicting each sample's verdict token;
    - ``rec_labels`` (S,) float, ``rec_coef`` (S,) float (alpha/theta), ``sample_index`` (S,) long;
    - ``user_ids`` (S,), ``target_ids`` (S,), ``hist_ids`` (sum of history lengths,), ``hist_counts`` (S,) long;
    - per-row CF vectors when the samples carry them (cf_source.py): ``user_vecs`` (S, d), ``target_vecs`` (S, d),
      ``hist_vecs`` (sum of history lengths, d) float32; they replace the table lookups of the matching ids.
    """

    def __init__(self, pad_token_id: int, packed: bool = True):
        self.base = PackingCollator(pad_token_id=pad_token_id, packed=packed)
        self.packed = packed

    def __call__(self, samples) -> dict[str, Any]:
        batch = self.base(samples)
        metas = [s.meta for s in samples]
        lengths = np.array([len(s) for s in samples])
        T = batch["input_ids"].shape[1]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if self.packed else np.arange(len(samples)) * T
        seg = batch["segment_ids"]
        mult = torch.tensor([m["lm_mult"] for m in metas] + [0.0], dtype=torch.float32)
        batch["lm_mult"] = mult[torch.where(seg >= 0, seg, torch.full_like(seg, len(metas)))]
        batch["rec_rows"] = torch.tensor(starts + np.array([m["answer_row"] for m in metas]), dtype=torch.long)
        batch["rec_labels"] = torch.tensor([m["label"] for m in metas], dtype=torch.float32)
        batch["rec_coef"] = torch.tensor([m["rec_coef"] for m in metas], dtype=torch.float32)
        batch["sample_index"] = torch.tensor([m["index"] for m in metas], dtype=torch.long)
        batch["user_ids"] = torch.tensor([m["user_id"] for m in metas], dtype=torch.long)
        batch["target_ids"] = torch.tensor([m["item_id"] for m in metas], dtype=torch.long)
        batch["hist_ids"] = torch.tensor([i for m in metas for i in m["history_ids"]], dtype=torch.long)
        batch["hist_counts"] = torch.tensor([len(m["history_ids"]) for m in metas], dtype=torch.long)
        for meta_key, key in (("cf_user", "user_vecs"), ("cf_target", "target_vecs")):
            if meta_key in metas[0]:
                batch[key] = torch.from_numpy(np.stack([m[meta_key] for m in metas]))
        if "cf_hist" in metas[0]:
            batch["hist_vecs"] = torch.from_numpy(np.concatenate([m["cf_hist"] for m in metas]))
        return batch
