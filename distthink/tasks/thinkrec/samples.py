"""ThinkRec rows -> encoded samples (reasoning or label-only answers) and the collator of their side inputs.

See distthink/tasks/thinkrec/task.py for how a row becomes a sample and what the side inputs feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from distthink.data.chat import encode_chat
from distthink.data.packing import PackingCollator
from distthink.data.types import IGNORE_INDEX
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.cf_source import open_cf_source
from distthink.tasks.thinkrec.options import ThinkRecOptions
from distthink.tasks.thinkrec.prepare import read_split

log = get_logger(__name__)


SPLIT_SEED = {"train": 0, "eval": 1, "test": 2}


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
