import pytest
import torch

from distthink.errors import DistthinkError
from distthink.inference.parse import close_thought_text, close_thoughts, parse_generation


def test_no_think_block():
    p = parse_generation("  The answer is 4.\n", finish_reason="stop")
    assert (p.reasoning, p.answer, p.think_state, p.num_think_blocks) == (None, "The answer is 4.", "absent", 0)
    assert not p.well_formed and p.finish_reason == "stop" and p.raw == "  The answer is 4.\n"


def test_closed_block_with_whitespace():
    p = parse_generation("\n<think>\n  step 1\n step 2 \n</think>\n\n  Four.  \n")
    assert p.reasoning == "step 1\n step 2" and p.answer == "Four."
    assert p.think_state == "closed" and p.well_formed and p.num_think_blocks == 1


def test_unclosed_think_hits_length_limit():
    p = parse_generation("<think>\nlet me think about this for a long", finish_reason="length")
    assert p.reasoning == "let me think about this for a long" and p.answer == ""
    assert p.think_state == "unclosed" and not p.well_formed and p.finish_reason == "length"


def test_multiple_think_blocks():
    p = parse_generation("<think>a</think> first <think> b </think>\nsecond")
    assert p.reasoning == "a\n\nb" and p.answer == "first\nsecond"
    assert p.num_think_blocks == 2 and p.think_state == "closed" and not p.well_formed


def test_close_tag_at_the_very_end():
    p = parse_generation("<think>\nall reasoning, no answer\n</think>")
    assert p.reasoning == "all reasoning, no answer" and p.answer == ""
    assert p.think_state == "closed" and p.well_formed and not p.has_answer


def test_empty_thought():
    p = parse_generation("<think>\n\n</think>\n\nBenzene has one ring.")
    assert p.reasoning == "" and p.answer == "Benzene has one ring."
    assert p.think_state == "empty" and p.well_formed
    q = parse_generation("<think></think>")
    assert q.think_state == "empty" and q.answer == "" and q.reasoning == ""


def test_prompt_opened_think_implied_opener():
    # Qwen3's template may put "<think>\n" in the prompt: the generation starts inside the thought.
    p = parse_generation("reasoning here\n</think>\n\nanswer")
    assert p.reasoning == "reasoning here" and p.answer == "answer" and p.well_formed
    q = parse_generation("still thinking", prompt_opened_think=True, finish_reason="length")
    assert q.think_state == "unclosed" and q.reasoning == "still thinking" and q.answer == ""
    r = parse_generation("still thinking")  # same text without the flag: no block at all
    assert r.think_state == "absent" and r.answer == "still thinking"


def test_stray_close_after_a_block_is_an_anomaly():
    p = parse_generation("<think>a</think> b </think> c")
    assert p.reasoning == "a\n\nb" and p.answer == "c" and p.anomalies == ["close_without_open"]
    assert not p.well_formed


def test_nested_open_and_text_before_block_are_not_well_formed():
    p = parse_generation("<think>a <think> b</think> c")
    assert p.reasoning == "a  b" and p.answer == "c" and p.anomalies == ["nested_open_tag"] and not p.well_formed
    q = parse_generation("preamble <think>x</think> ans")
    assert q.reasoning == "x" and q.answer == "preamble\nans" and not q.well_formed


def test_stop_strings_cut_the_text():
    p = parse_generation("<think>r</think>\n\nans<|im_end|>\n<|im_start|>user\nmore")
    assert p.answer == "ans" and p.well_formed
    assert p.raw.endswith("more")


def test_to_dict_has_the_record_fields():
    d = parse_generation("<think>r</think>a", finish_reason="stop").to_dict()
    assert {"reasoning", "answer", "raw", "finish_reason"} <= set(d)
    with pytest.raises(DistthinkError):
        parse_generation(None)


def test_real_qwen3_tokens_roundtrip(qwen3_tokenizer):
    ids = qwen3_tokenizer.encode("<think>\nLet me see.\n</think>\n\nIt has two rings.<|im_end|>",
                                 add_special_tokens=False)
    p = parse_generation(qwen3_tokenizer.decode(ids, skip_special_tokens=False))
    assert (p.reasoning, p.answer, p.well_formed) == ("Let me see.", "It has two rings.", True)


# ------------------------------------------------------------------- close_thoughts (free think mode)

OPEN, CLOSE, NL, EOS, PAD = 7, 8, 9, 0, -1


def test_close_thoughts_edge_cases():
    gen = [
        [OPEN, 1, 2, 3, CLOSE, NL, 50, 51, EOS],  # closed: answer after </think> dropped
        [OPEN, 1, 2, 3, 4, 5],                    # hit the length limit: unclosed
        [OPEN, 1, EOS, PAD, PAD],                 # ended its turn inside the thought
        [OPEN, CLOSE, EOS],                       # empty thought
        [1, 2, CLOSE],                            # opener was in the prompt; </think> at the very end
    ]
    out = close_thoughts(gen, close_ids=[CLOSE], after_close_ids=[NL], open_ids=[OPEN], stop_ids=[EOS, PAD])
    assert out.sequences == [
        [OPEN, 1, 2, 3, CLOSE, NL],
        [OPEN, 1, 2, 3, 4, 5, CLOSE, NL],
        [OPEN, 1, CLOSE, NL],
        [OPEN, CLOSE, NL],
        [1, 2, CLOSE, NL],
    ]
    assert out.closed_by_us == [False, True, True, False, False]
    assert out.num_closed == 2 and out.fraction_closed == pytest.approx(0.4)
    assert out.think_lengths == [3, 5, 1, 0, 2]


def test_close_thoughts_truncates_and_multi_token_close():
    out = close_thoughts(torch.tensor([[OPEN, 1, 2, 3, 4, 5]]).tolist(), close_ids=[CLOSE, 10], open_ids=[OPEN],
                         max_think_tokens=3)
    assert out.sequences == [[OPEN, 1, 2, 3, CLOSE, 10]] and out.think_lengths == [3]
    found = close_thoughts([[1, CLOSE, 10, 4]], close_ids=[CLOSE, 10])
    assert found.sequences == [[1, CLOSE, 10]] and found.closed_by_us == [False]
    with pytest.raises(DistthinkError):
        close_thoughts([[1]], close_ids=[])


def test_close_thoughts_with_qwen3_ids(qwen3_tokenizer):
    tok = qwen3_tokenizer
    close = tok.encode("</think>", add_special_tokens=False)
    nl = tok.encode("\n\n", add_special_tokens=False)
    gen = tok.encode("<think>\nhmm, a ring", add_special_tokens=False)
    out = close_thoughts([gen], close_ids=close, after_close_ids=nl, stop_ids=[tok.eos_token_id])
    assert len(close) == 1 and out.closed_by_us == [True]
    assert tok.decode(out.sequences[0]) == "<think>\nhmm, a ring</think>\n\n"


def test_close_thought_text():
    assert close_thought_text("<think>\nr\n</think>\n\nmodel answer") == ("<think>\nr\n</think>\n\n", False)
    assert close_thought_text("<think>\nunfinished  ") == ("<think>\nunfinished\n</think>\n\n", True)
    assert close_thought_text("<think>\nx<|im_end|>junk") == ("<think>\nx\n</think>\n\n", True)
