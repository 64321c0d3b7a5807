"""Caption metrics, computed offline: BLEU-4, ROUGE-L, METEOR (no-synonym variant), and thinking statistics.

Definitions (all scores in [0, 1]):

- Tokenisation: lower-cased, ``re.findall(r"\\w+|[^\\w\\s]")`` (words and single punctuation marks). Override
  with ``tokenize=``. Published molecule-captioning numbers (MolT5 and successors) use a BERT word-piece
  tokeniser, so absolute values are comparable only to runs that use the same tokeniser.
- **BLEU-4 (corpus)**: Papineni et al. 2002. Clipped n-gram matches and candidate n-gram counts are summed
  over the corpus for n = 1..4, geometric mean with uniform weights, brevity penalty
  ``exp(1 - r/c)`` when ``c <= r`` (c, r: total candidate / reference lengths). No smoothing: if some order has
  zero matches the score is 0. One reference per sample.
- **BLEU-4 (sentence)**, per sample in the Parquet: same formula on one pair, with Lin & Och (2004) add-one
  smoothing for n >= 2 (``(m_n + 1) / (c_n + 1)``) so short answers do not all collapse to 0.
- **ROUGE-L**: LCS-based, per sample ``P = LCS/len(hyp)``, ``R = LCS/len(ref)``, ``F = 2PR/(P+R)``
  (the ``fmeasure`` of Google's rouge-score); reported as the mean F over samples.
- **METEOR (no synonyms)**: NLTK's METEOR (alpha=0.9, beta=3, gamma=0.5) with its exact and Porter-stem
  matching stages, but *without* the WordNet synonym stage: WordNet data cannot be downloaded offline, so a
  stub with no synsets is passed. It is therefore <= the official score whenever synonyms would have matched;
  it is reported as ``meteor_nosyn`` so nobody mistakes it for full METEOR. If nltk is not installed it is
  omitted (and ``summary["meteor_nosyn"]`` is None).
- **Thinking**: ``well_formed_think`` = fraction of outputs whose think block is well formed (see
  :mod:`distthink.inference.parse`); ``avg_think_len`` = mean reasoning length over outputs that have a think
  block, in tokenizer tokens when a tokenizer is given, else in whitespace words (``think_len_unit`` says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import pandas as pd
from nltk.translate.meteor_score import single_meteor_score

from distthink.data.jsonl import iter_jsonl
from distthink.errors import DataError
from distthink.inference.parse import parse_generation

if TYPE_CHECKING:
    import pandas

_TOKEN = re.compile(r"\w+|[^\w\s]")

__all__ = ["tokenize", "corpus_bleu4", "sentence_bleu4", "rouge_l", "meteor_nosyn", "meteor_available",
           "CaptionReport", "evaluate_captions", "main"]


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_counts(hyp: Sequence[str], ref: Sequence[str], max_n: int = 4) -> tuple[list[int], list[int]]:
    matches, totals = [], []
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matches.append(sum(min(c, r[g]) for g, c in h.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    return matches, totals


def _brevity_penalty(c: int, r: int) -> float:
    if c == 0:
        return 0.0
    return 1.0 if c > r else math.exp(1.0 - r / c)


def corpus_bleu4(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 of tokenised hypotheses against one tokenised reference each (no smoothing)."""
    if len(hyps) != len(refs):
        raise DataError(f"{len(hyps)} hypotheses but {len(refs)} references", fix="pass one reference per output")
    m_tot, c_tot = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        m, c = _bleu_counts(h, r)
        m_tot = [a + b for a, b in zip(m_tot, m)]
        c_tot = [a + b for a, b in zip(c_tot, c)]
        hyp_len += len(h)
        ref_len += len(r)
    if min(m_tot) == 0:
        return 0.0
    log_p = sum(math.log(m / c) for m, c in zip(m_tot, c_tot)) / 4
    return _brevity_penalty(hyp_len, ref_len) * math.exp(log_p)


def sentence_bleu4(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """Sentence BLEU-4 with Lin & Och add-one smoothing for n >= 2."""
    if not hyp:
        return 0.0
    m, c = _bleu_counts(hyp, ref)
    if m[0] == 0:
        return 0.0
    precisions = [m[0] / c[0]] + [(m[n] + 1) / (c[n] + 1) for n in range(1, 4)]
    return _brevity_penalty(len(hyp), len(ref)) * math.exp(sum(math.log(p) for p in precisions) / 4)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of one tokenised pair."""
    lcs = _lcs(hyp, ref)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    p, r = lcs / len(hyp), lcs / len(ref)
    return {"precision": p, "recall": r, "f": 2 * p * r / (p + r)}


class _NoSynonyms:
    """Stands in for NLTK's WordNet reader: no synsets, so METEOR's synonym stage matches nothing."""

    def synsets(self, *args, **kwargs):
        return []


def meteor_available() -> bool:
    return importlib.util.find_spec("nltk") is not None


def meteor_nosyn(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """NLTK METEOR with exact + Porter-stem matching and no WordNet synonyms (see the module docstring)."""
    if not hyp or not ref:
        return 0.0
    return float(single_meteor_score(list(ref), list(hyp), wordnet=_NoSynonyms()))


@dataclass
class CaptionReport:
    """``summary``: corpus figures (dict, JSON-ready). ``per_sample``: a pandas DataFrame, one row per output."""

    summary: dict
    per_sample: pandas.DataFrame


def evaluate_captions(generations: Sequence[dict | str], references: Sequence[str], *,
                      ids: Sequence | None = None, tokenizer=None,
                      tokenize_fn: Callable[[str], list[str]] = tokenize,
                      out_parquet: str | Path | None = None) -> CaptionReport:
    """Score generated captions against references.

    ``generations``: raw strings, or records. A record with an ``answer`` key is used as parsed (fields of
    :class:`~distthink.inference.parse.ParsedGeneration`); otherwise its ``raw`` (or ``text``) is parsed.
    ``tokenizer``: optional HF tokenizer, used only to measure thinking length in tokens.
    Writes the per-sample table to ``out_parquet`` when given.
    """
    if len(generations) != len(references):
        raise DataError(f"{len(generations)} generations but {len(references)} references",
                        fix="generate for every reference (or filter both the same way)")
    rows = []
    hyps, refs = [], []
    use_meteor = meteor_available()
    for i, (gen, ref) in enumerate(zip(generations, references)):
        parsed = _as_parsed(gen, i)
        h, r = tokenize_fn(parsed["answer"] or ""), tokenize_fn(ref)
        hyps.append(h)
        refs.append(r)
        reasoning = parsed.get("reasoning")
        think_len = None
        if reasoning is not None:
            think_len = (len(tokenizer.encode(reasoning, add_special_tokens=False)) if tokenizer is not None
                         else len(reasoning.split()))
        rl = rouge_l(h, r)
        rows.append({
            "id": ids[i] if ids is not None else i,
            "answer": parsed["answer"],
            "reference": ref,
            "reasoning": reasoning,
            "think_state": parsed.get("think_state"),
            "well_formed_think": bool(parsed.get("well_formed", False)),
            "think_len": think_len,
            "finish_reason": parsed.get("finish_reason"),
            "bleu4": sentence_bleu4(h, r),
            "rouge_l_f": rl["f"],
            "rouge_l_p": rl["precision"],
            "rouge_l_r": rl["recall"],
            "meteor_nosyn": meteor_nosyn(h, r) if use_meteor else None,
        })
    df = pd.DataFrame(rows)
    n = len(df)
    think_lens = [x for x in df["think_len"] if x is not None and not pd.isna(x)] if n else []
    summary = {
        "num_samples": n,
        "bleu4": corpus_bleu4(hyps, refs) if n else 0.0,
        "bleu4_sentence_mean": float(df["bleu4"].mean()) if n else 0.0,
        "rouge_l": float(df["rouge_l_f"].mean()) if n else 0.0,
        "meteor_nosyn": float(df["meteor_nosyn"].mean()) if (n and use_meteor) else None,
        "well_formed_think": float(df["well_formed_think"].mean()) if n else 0.0,
        "with_think_block": len(think_lens) / n if n else 0.0,
        "avg_think_len": (sum(think_lens) / len(think_lens)) if think_lens else 0.0,
        "think_len_unit": "tokens" if tokenizer is not None else "words",
        "empty_answers": int((df["answer"] == "").sum()) if n else 0,
        "metrics_note": "BLEU-4/ROUGE-L exact; METEOR without WordNet synonyms" if use_meteor
        else "BLEU-4/ROUGE-L exact; METEOR unavailable (nltk not installed)",
    }
    if out_parquet is not None:
        out = Path(out_parquet)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out, index=False)
    return CaptionReport(summary=summary, per_sample=df)


def _as_parsed(gen, i: int) -> dict:
    if isinstance(gen, str):
        return parse_generation(gen).to_dict()
    if isinstance(gen, dict):
        if "answer" in gen:
            return gen
        text = gen.get("raw", gen.get("text"))
        if isinstance(text, str):
            return parse_generation(text, finish_reason=gen.get("finish_reason")).to_dict()
    raise DataError("generation record has neither 'answer' nor 'raw'/'text'", line=i + 1, field="answer",
                    fix="pass the records written by `distthink generate`, or raw strings")


def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def main(argv: list[str] | None = None) -> int:
    """``python -m distthink.inference.metrics --generations G.jsonl --references R.jsonl [--out X.parquet]``.

    Generations and references are matched by ``id`` when both files have one, else by line order.
    References use the ``description`` field (the demo set's), or ``--ref-field``.
    """
    ap = argparse.ArgumentParser(description="Caption metrics (BLEU-4, ROUGE-L, METEOR-nosyn, thinking stats)")
    ap.add_argument("--generations", type=Path, required=True)
    ap.add_argument("--references", type=Path, required=True)
    ap.add_argument("--ref-field", default="description")
    ap.add_argument("--out", type=Path, default=None, help="per-sample Parquet")
    args = ap.parse_args(argv)
    gens, refs = _read_jsonl(args.generations), _read_jsonl(args.references)
    if all("id" in g for g in gens) and all("id" in r for r in refs):
        by_id = {r["id"]: r for r in refs}
        missing = [g["id"] for g in gens if g["id"] not in by_id]
        if missing:
            raise DataError(f"{len(missing)} generation ids are not in the references, e.g. {missing[:3]}",
                            source=str(args.generations), field="id", fix="use the same split for both")
        refs = [by_id[g["id"]] for g in gens]
    for n, r in enumerate(refs, 1):
        if not isinstance(r.get(args.ref_field), str):
            raise DataError("reference has no text", source=str(args.references), line=n, field=args.ref_field,
                            fix="set --ref-field to the field holding the reference caption")
    report = evaluate_captions(gens, [r[args.ref_field] for r in refs], ids=[g.get("id", i) for i, g in
                                                                            enumerate(gens)], out_parquet=args.out)
    print(json.dumps(report.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
