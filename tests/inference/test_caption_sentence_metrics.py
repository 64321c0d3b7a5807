"""scripts/caption_sentence_metrics.py: per-sentence / per-fact accuracy of demo captions."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distthink.tasks.molecule.demo import caption_from_facts, load_demo

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "caption_sentence_metrics.py"
_spec = importlib.util.spec_from_file_location("caption_sentence_metrics", SCRIPT)
csm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(csm)

REF = ("This molecule has 2 rings (1 aromatic). It contains 1 benzene ring, 2 nitrogens without hydrogen and "
       "1 ester. Its heavy atoms are C, N and O. It is a medium-sized molecule (180 to 300 Da) with "
       "1 hydrogen-bond donor and 3 hydrogen-bond acceptors.")


def test_parse_facts_reads_back_every_fact_of_the_shipped_captions():
    # The parser is the inverse of caption_from_facts on every shipped caption (independent source: the facts).
    for row in load_demo("test"):
        f, got = row["facts"], csm.parse_facts(row["description"])
        assert caption_from_facts(f) == row["description"]
        assert got["num_rings"] == f["num_rings"]
        assert got["elements"] == frozenset(f["elements"])
        assert (got["mw_class"], got["hbd"], got["hba"]) == (f["mw_class"], f["hbd"], f["hba"])
        assert sum(got["groups"].values()) == len(f["groups"])
        assert {csm._group_name(x) for x in got["groups"]} == set(f["groups"])
        assert csm.summarize([csm.score_sample(row["description"], row["description"])])["exact_caption"] == 1.0


def test_hand_scored_hypothesis():
    # Reordered sentences, wrong ring count, one group count wrong, one group missing, hba wrong.
    hyp = ("It contains 1 benzene ring and 1 nitrogen without hydrogen. This molecule has 3 rings (1 aromatic). "
           "Its heavy atoms are C, N and O. It is a medium-sized molecule (180 to 300 Da) with "
           "1 hydrogen-bond donor and 4 hydrogen-bond acceptors.")
    row = csm.score_sample(hyp, REF)
    assert row["exact_caption"] is False
    assert [row[f"sentence_exact.{k}"] for k in csm.KINDS] == [False, False, True, False]
    assert row["facts.num_rings"] is False and row["facts.aromatic"] is True
    assert row["facts.elements"] and row["facts.mw_class"] and row["facts.hbd"]
    assert row["facts.hba"] is False and row["facts.groups_exact"] is False
    # items: hyp {1 benzene ring, 1 nitrogen w/o H}, ref {1 benzene ring, 2 nitrogens w/o H, 1 ester}
    assert (row["groups_hyp_items"], row["groups_ref_items"], row["groups_matched_items"]) == (2, 3, 1)
    assert (row["groups_hyp_names"], row["groups_ref_names"], row["groups_matched_names"]) == (2, 3, 2)
    s = csm.summarize([row, csm.score_sample(REF, REF)])
    assert s["exact_caption"] == 0.5 and s["sentence_exact.elements"] == 1.0
    p, r = 4 / 5, 4 / 6  # items over both samples: matched 1+3, hyp 2+3, ref 3+3
    assert s["groups_item_precision"] == pytest.approx(p)
    assert s["groups_item_recall"] == pytest.approx(r)
    assert s["groups_item_f1"] == pytest.approx(2 * p * r / (p + r))


def test_missing_and_alternative_sentences():
    row = csm.score_sample("This molecule is acyclic.", "This molecule is acyclic. It has none of the common "
                           "functional groups. Its heavy atoms are all C. It is a light molecule (under 180 Da) "
                           "with 0 hydrogen-bond donors and 0 hydrogen-bond acceptors.")
    assert row["sentence_exact.ring"] and row["facts.num_rings"]
    assert not row["sentence_exact.groups"] and not row["facts.groups_exact"] and not row["facts.hbd"]
    assert csm.parse_facts("Its heavy atoms are all C.")["elements"] == frozenset({"C"})


def test_cli(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"id": "a", "description": REF}) + "\n" + json.dumps({"id": "b", "description": REF}) + "\n")
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"id": "b", "answer": REF}) + "\n" + json.dumps({"id": "a", "answer": "x"}) + "\n")
    out = subprocess.run([sys.executable, str(SCRIPT), "--generations", str(gens), "--references", str(refs),
                          "--out", str(tmp_path / "rows.jsonl")], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["exact_caption"] == 0.5 and summary["facts.hba"] == 0.5
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    gens.write_text(json.dumps({"id": "zzz", "answer": REF}) + "\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--generations", str(gens), "--references", str(refs)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "zzz" in bad.stderr
