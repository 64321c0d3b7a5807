"""Per-sentence and per-fact accuracy of generated demo-set captions (distthink.tasks.molecule.demo).

BLEU/ROUGE/METEOR (``distthink eval captions``) say how close a caption is in words; they cannot say *which*
facts a model gets right. The demo captions are four sentences, each a deterministic function of the graph
(``caption_from_facts``)::

    ring      "This molecule has 2 rings (1 aromatic)." | "This molecule is acyclic."
    groups    "It contains 1 ester, 2 nitrogens without hydrogen and 1 aniline." | "It has none of the ..."
    elements  "Its heavy atoms are C, N and O." | "Its heavy atoms are all C."
    size      "It is a light molecule (under 180 Da) with 1 hydrogen-bond donor and 2 hydrogen-bond acceptors."

This tool matches each reference sentence with the generated sentence of the same kind (found by its opening
words, so a missing or reordered sentence counts as wrong, not as a shift of everything after it) and reports:

- ``exact_caption``: whole answer equals the reference (whitespace-normalised);
- ``sentence_exact.<kind>``: the sentence of that kind equals the reference sentence;
- ``facts.<name>``: one parsed fact is right: ``num_rings``, ``aromatic`` (the parenthesis), ``elements`` (as a
  set), ``mw_class``, ``hbd``, ``hba``, ``groups_exact`` (the whole group multiset);
- ``groups_item_{precision,recall,f1}``: micro-averaged over group items ("2 benzene rings" is one item, so the
  count must be right too); ``groups_name_f1`` ignores the counts (is it the right group at all?).

Usage (prints one JSON line; ``--out`` also writes one JSON row per sample)::

    python scripts/caption_sentence_metrics.py --generations gen.jsonl --references demo_test.jsonl [--out rows.jsonl]

Generations are ``distthink generate`` records (``id``, ``answer``); references are demo rows (``id``,
``description``). Rows are matched by id.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

KINDS = ("ring", "groups", "elements", "size")
_OPENINGS = (("ring", "this molecule "), ("groups", "it contains "), ("groups", "it has none of"),
             ("elements", "its heavy atoms "), ("size", "it is a "))
_SENTENCE_END = re.compile(r"(?<=\.)\s+")
_RING = re.compile(r"has (\d+) rings? \(([^)]*)\)")
_ITEM = re.compile(r"^(\d+) (.+)$")
_SIZE = re.compile(r"it is an? (\S+) molecule .*?with (\d+) hydrogen-bond donors? and (\d+) hydrogen-bond acceptors?")


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def split_sentences(caption: str) -> dict[str, str]:
    """Sentences by kind (the first of each kind wins); sentences of no known kind are ignored."""
    out: dict[str, str] = {}
    for sent in _SENTENCE_END.split(_norm(caption)):
        low = sent.lower()
        for kind, opening in _OPENINGS:
            if low.startswith(opening):
                out.setdefault(kind, sent)
                break
    return out


def _split_list(body: str) -> list[str]:
    """'a, b and c' -> [a, b, c] (the inverse of molecule_demo._join)."""
    body = body.strip().rstrip(".")
    if not body:
        return []
    head, _, last = body.rpartition(" and ")
    items = [x.strip() for x in head.split(",")] + [last.strip()] if head else [last.strip()]
    return [x for x in items if x]


def parse_facts(caption: str) -> dict:
    """Facts read back from a caption; a fact whose sentence is missing or malformed is None."""
    s = split_sentences(caption)
    facts: dict = {k: None for k in ("num_rings", "aromatic", "groups", "elements", "mw_class", "hbd", "hba")}
    ring = s.get("ring", "").lower()
    if "acyclic" in ring:
        facts["num_rings"], facts["aromatic"] = 0, ""
    elif m := _RING.search(ring):
        facts["num_rings"], facts["aromatic"] = int(m.group(1)), m.group(2).strip()
    grp = s.get("groups", "")
    if grp.lower().startswith("it has none of"):
        facts["groups"] = Counter()
    elif grp.lower().startswith("it contains "):
        facts["groups"] = Counter(_split_list(grp[len("it contains "):]))
    el = s.get("elements", "")
    if el.lower().startswith("its heavy atoms are all "):
        facts["elements"] = frozenset(_split_list(el[len("its heavy atoms are all "):]))
    elif el.lower().startswith("its heavy atoms are "):
        facts["elements"] = frozenset(_split_list(el[len("its heavy atoms are "):]))
    if m := _SIZE.search(s.get("size", "").lower()):
        facts["mw_class"], facts["hbd"], facts["hba"] = m.group(1), int(m.group(2)), int(m.group(3))
    return facts


def _group_name(item: str) -> str:
    """'2 benzene rings' -> 'fr_benzene' (the RDKit fragment behind the phrase; unknown phrases as they are)."""
    from distthink.tasks.molecule.demo import FUNCTIONAL_GROUPS

    names = {}
    for fn, singular, plural in FUNCTIONAL_GROUPS:
        names[singular], names[plural] = fn, fn
    m = _ITEM.match(item)
    phrase = m.group(2) if m else item
    return names.get(phrase, phrase)


def score_sample(answer: str, reference: str) -> dict:
    """Per-sample row: exactness per sentence kind, per fact, and group item counts (for micro averages)."""
    hs, rs = split_sentences(answer), split_sentences(reference)
    hf, rf = parse_facts(answer), parse_facts(reference)
    row = {"exact_caption": _norm(answer) == _norm(reference)}
    for kind in KINDS:
        row[f"sentence_exact.{kind}"] = kind in rs and hs.get(kind) == rs[kind]
    for name in ("num_rings", "aromatic", "elements", "mw_class", "hbd", "hba"):
        row[f"facts.{name}"] = rf[name] is not None and hf[name] == rf[name]
    row["facts.groups_exact"] = rf["groups"] is not None and hf["groups"] == rf["groups"]
    hg, rg = hf["groups"] or Counter(), rf["groups"] or Counter()
    row["groups_hyp_items"], row["groups_ref_items"] = sum(hg.values()), sum(rg.values())
    row["groups_matched_items"] = sum((hg & rg).values())
    hn_set, rn_set = {_group_name(x) for x in hg}, {_group_name(x) for x in rg}
    row["groups_hyp_names"], row["groups_ref_names"] = len(hn_set), len(rn_set)
    row["groups_matched_names"] = len(hn_set & rn_set)
    return row


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def summarize(rows: list[dict]) -> dict:
    """Rates over samples; group precision/recall/F1 micro-averaged over items (names: over distinct names)."""
    n = len(rows)
    out: dict = {"n": n}
    if not n:
        return out
    keys = ["exact_caption"] + [f"sentence_exact.{k}" for k in KINDS] + \
        [f"facts.{k}" for k in ("num_rings", "aromatic", "groups_exact", "elements", "mw_class", "hbd", "hba")]
    for k in keys:
        out[k] = sum(bool(r[k]) for r in rows) / n
    hyp, ref, hit = (sum(r[f"groups_{x}_items"] for r in rows) for x in ("hyp", "ref", "matched"))
    p, rc = (hit / hyp if hyp else 0.0), (hit / ref if ref else 0.0)
    out.update({"groups_item_precision": p, "groups_item_recall": rc, "groups_item_f1": _f1(p, rc)})
    hyp, ref, hit = (sum(r[f"groups_{x}_names"] for r in rows) for x in ("hyp", "ref", "matched"))
    out["groups_name_f1"] = _f1(hit / hyp if hyp else 0.0, hit / ref if ref else 0.0)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_files(generations: Path, references: Path, ref_field: str = "description") -> tuple[dict, list[dict]]:
    gens, refs = _read_jsonl(generations), _read_jsonl(references)
    by_id = {r["id"]: r for r in refs}
    missing = [g.get("id") for g in gens if g.get("id") not in by_id]
    if missing:
        raise SystemExit(f"error: {len(missing)} generation ids not in {references} (first: {missing[0]!r}). "
                         "Fix: pass the references file the generations were made from.")
    rows = []
    for g in gens:
        row = score_sample(g.get("answer") or "", by_id[g["id"]][ref_field])
        rows.append({"id": g["id"], **row})
    return summarize(rows), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generations", required=True, type=Path, help="JSONL from `distthink generate`")
    ap.add_argument("--references", required=True, type=Path, help="demo-set JSONL (id, description)")
    ap.add_argument("--ref-field", default="description")
    ap.add_argument("--out", type=Path, help="per-sample JSONL")
    args = ap.parse_args(argv)
    summary, rows = evaluate_files(args.generations, args.references, args.ref_field)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
