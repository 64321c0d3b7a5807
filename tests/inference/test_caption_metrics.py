import json
import math

import pytest

from distthink.errors import DataError
from distthink.inference.metrics import (
    corpus_bleu4,
    evaluate_captions,
    main,
    meteor_available,
    meteor_nosyn,
    rouge_l,
    sentence_bleu4,
    tokenize,
)

REF = tokenize("the cat sat on the mat")


def test_tokenize():
    assert tokenize("It has 2 rings (1 aromatic).") == ["it", "has", "2", "rings", "(", "1", "aromatic", ")", "."]


def test_corpus_bleu4_hand_computed():
    hyp = tokenize("the cat sat on a mat")
    # p1 = 5/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, equal lengths -> BP = 1
    assert corpus_bleu4([hyp], [REF]) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # corpus sums counts before dividing: matches [9,6,4,2] over [10,8,6,4]
    two = corpus_bleu4([hyp, list("abcd")], [REF, list("abcd")])
    assert two == pytest.approx((9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25)
    assert corpus_bleu4([REF], [REF]) == pytest.approx(1.0)
    # an order with zero matches -> 0 without smoothing
    assert corpus_bleu4([tokenize("the cat")], [REF]) == 0.0
    with pytest.raises(DataError):
        corpus_bleu4([hyp], [])


def test_brevity_penalty_and_sentence_smoothing():
    hyp = tokenize("the cat")
    # p1 = 1, p2..p4 smoothed to 1 (no higher n-grams in the candidate), BP = exp(1 - 6/2)
    assert sentence_bleu4(hyp, REF) == pytest.approx(math.exp(-2))
    hyp2 = tokenize("the cat sat on a mat")
    # p1 = 5/6, p2 = (3+1)/(5+1), p3 = (2+1)/(4+1), p4 = (1+1)/(3+1)
    assert sentence_bleu4(hyp2, REF) == pytest.approx((5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    assert sentence_bleu4([], REF) == 0.0 and sentence_bleu4(["dog"], REF) == 0.0


def test_bleu_matches_nltk_reference():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hyps = [tokenize("the cat sat on a mat"), tokenize("this molecule has 2 rings and one ester"),
            tokenize("it contains 1 benzene ring and 1 nitro group .")]
    refs = [REF, tokenize("this molecule has 2 rings ( all aromatic ) and 1 ester"),
            tokenize("it contains 1 benzene ring , 1 nitro group and 2 halogen atoms .")]
    ours = corpus_bleu4(hyps, refs)
    theirs = nltk_bleu.corpus_bleu([[r] for r in refs], hyps)
    assert ours == pytest.approx(theirs, rel=1e-12)  # the same float64 formula in another order: ~1e-16 apart


def test_rouge_l_hand_computed():
    r = rouge_l(tokenize("the cat on mat"), REF)  # LCS 4: P = 1, R = 4/6
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(4 / 6) and r["f"] == pytest.approx(0.8)
    r2 = rouge_l(tokenize("mat the cat"), REF)  # LCS 2 ("the cat"): P = 2/3, R = 2/6
    assert r2["f"] == pytest.approx(2 * (2 / 3) * (1 / 3) / (2 / 3 + 1 / 3))
    assert rouge_l([], REF)["f"] == 0.0


@pytest.mark.skipif(not meteor_available(), reason="nltk not installed")
def test_meteor_nosyn_hand_computed():
    # identical: P = R = 1, 1 chunk over 6 matches -> penalty 0.5 * (1/6)^3
    assert meteor_nosyn(REF, REF) == pytest.approx(1 - 0.5 * (1 / 6) ** 3)
    # Porter-stem stage matches cats/cat and running/run; 1 chunk of 2 -> penalty 0.5 * (1/2)^3
    assert meteor_nosyn(["cat", "run"], ["cats", "running"]) == pytest.approx(1 - 0.5 / 8)
    # swapped order: 2 chunks of 1 -> penalty 0.5
    assert meteor_nosyn(["mat", "the"], ["the", "mat"]) == pytest.approx(0.5)
    # no synonym stage: a WordNet synonym does not match (and nothing is downloaded)
    assert meteor_nosyn(["big"], ["large"]) == 0.0


def test_evaluate_captions_thinking_stats_and_parquet(tmp_path):
    import pandas as pd

    gens = ["<think>a b c</think>\n\nthe cat sat on the mat",  # well formed, 3 words of thought
            "the cat sat",                                     # no think block
            {"raw": "<think>x y", "finish_reason": "length"}]  # unclosed, 2 words, empty answer
    refs = ["the cat sat on the mat"] * 3
    rep = evaluate_captions(gens, refs, ids=["m1", "m2", "m3"], out_parquet=tmp_path / "r.parquet")
    s = rep.summary
    assert s["num_samples"] == 3 and s["well_formed_think"] == pytest.approx(1 / 3)
    assert s["with_think_block"] == pytest.approx(2 / 3) and s["avg_think_len"] == pytest.approx(2.5)
    assert s["think_len_unit"] == "words" and s["empty_answers"] == 1
    assert s["rouge_l"] == pytest.approx((1.0 + 2 * 1 * 0.5 / 1.5 + 0.0) / 3)
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert list(df["id"]) == ["m1", "m2", "m3"] and list(df["think_state"]) == ["closed", "absent", "unclosed"]
    assert df.loc[2, "finish_reason"] == "length" and df.loc[0, "bleu4"] == pytest.approx(1.0)
    json.dumps(s)  # JSON-ready
    with pytest.raises(DataError):
        evaluate_captions(["a"], ["a", "b"])
    with pytest.raises(DataError, match="line 1"):
        evaluate_captions([{"foo": 1}], ["a"])


def test_think_length_in_tokens(qwen3_tokenizer):
    rep = evaluate_captions(["<think>\nbenzene ring\n</think>\n\nok"], ["ok"], tokenizer=qwen3_tokenizer)
    n = len(qwen3_tokenizer.encode("benzene ring", add_special_tokens=False))
    assert rep.summary["avg_think_len"] == n and rep.summary["think_len_unit"] == "tokens"


def test_cli_matches_by_id(tmp_path, capsys):
    (tmp_path / "g.jsonl").write_text(
        json.dumps({"id": "b", "raw": "<think>t</think>beta"}) + "\n" + json.dumps({"id": "a", "answer": "alpha",
                                                                                    "reasoning": None}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "a", "description": "alpha"}) + "\n" +
                                      json.dumps({"id": "b", "description": "beta"}) + "\n")
    assert main(["--generations", str(tmp_path / "g.jsonl"), "--references", str(tmp_path / "r.jsonl"),
                 "--out", str(tmp_path / "o.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rouge_l"] == 1.0 and summary["well_formed_think"] == 0.5
