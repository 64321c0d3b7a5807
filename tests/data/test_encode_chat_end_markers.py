"""Assistant turns that end in a plain-text marker ("### End", or "</s>" written as text that the tokenizer does
not hold as one added token) learn that marker, in full tokens, like a special end-of-turn token.

Oracle (shares no code with distthink.data.chat): render with apply_chat_template, tokenise with offsets, find
each assistant content and the template's marker after it with str.find. Learned = every token overlapping
[end of the generation prompt, end of the marker); nothing else. The templates are written here in the style of
community instruction templates (Alpaca with an end line, Vicuna v1.1 with "</s>" as text)."""

from __future__ import annotations

import copy
import logging

import pytest

from distthink.data import chat
from distthink.data.chat import encode_chat
from distthink.models.tiny import FAMILIES, tiny_tokenizer

# Alpaca-style: "### Response:" header, a blank line and "### End" closing every answer.
ALPACA_END = ("{% for m in messages %}{% if m.role == 'system' %}{{ m.content + '\n\n' }}"
              "{% elif m.role == 'user' %}{{ '### Instruction:\n' + m.content + '\n\n' }}"
              "{% elif m.role == 'assistant' %}{{ '### Response:\n' + m.content + '\n\n### End\n\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")
# Vicuna v1.1-style: "USER: q ASSISTANT: a</s>USER: ..." with "</s>" as literal text, no separator after it.
VICUNA_TEXT = ("{% if messages[0].role == 'system' %}{{ messages[0].content + ' ' }}{% endif %}"
               "{% for m in messages %}{% if m.role == 'user' %}{{ 'USER: ' + m.content + ' ' }}"
               "{% elif m.role == 'assistant' %}{{ 'ASSISTANT: ' + m.content + '</s>' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# An end line between turns and eos only once, at the end of the conversation (a footer the final turn owns).
END_THEN_EOS = ALPACA_END.replace("{% endfor %}", "{% endfor %}{% if not add_generation_prompt %}"
                                                 "{{ eos_token }}{% endif %}")
# No marker at all: the model cannot learn to stop, and is told so.
NO_MARKER = ALPACA_END.replace("\n\n### End\n\n", "\n\n")

# template -> (generation prompt, marker after a turn that is followed by another, marker of the final turn,
#              the next turn's header)
STYLES = {"alpaca_end": (ALPACA_END, "### Response:\n", "### End", "### End", "### Instruction:"),
          "vicuna_text": (VICUNA_TEXT, "ASSISTANT:", "</s>", "</s>", "USER:"),
          "end_then_eos": (END_THEN_EOS, "### Response:\n", "### End", None, "### Instruction:")}

MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "Double it."},
        {"role": "assistant", "content": "It is 84.", "loss_weight": 0.5}]
ANSWERS = [("The answer is 42.", 1.0), ("It is 84.", 0.5)]
TOKENIZERS = [*FAMILIES, "real_qwen3"]


@pytest.fixture(scope="module")
def toks(qwen3_tokenizer):
    out = {f: tiny_tokenizer(f) for f in FAMILIES}
    out["real_qwen3"] = copy.deepcopy(qwen3_tokenizer)  # the session fixture is shared: its template stays
    return out


def make(toks, name, template):
    tok = toks[name]
    tok.chat_template = template
    return tok


def spans(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def overlapping(offs, start, end):
    return {i for i, (a, b) in enumerate(offs) if b > a and a < end and b > start}


def expected(tok, text, header, marker, last_marker):
    """{token index: weight} the oracle says is learned, and the character ranges of the markers."""
    _, offs = spans(tok, text)
    want, markers = {}, []
    for k, (content, lw) in enumerate(ANSWERS):
        c = text.find(content)
        assert c >= 0 and text.count(content) == 1
        start = text.rfind(header, 0, c) + len(header)
        mk = marker if k < len(ANSWERS) - 1 else (last_marker or tok.eos_token)
        m = text.find(mk, c + len(content))
        # the template writes only whitespace between the content and the marker (and, for the footer, the end
        # line before the eos)
        assert m >= 0 and (not text[c + len(content):m].strip() or last_marker is None), text[c:]
        markers.append((m, m + len(mk)))
        for i in overlapping(offs, start, m + len(mk)):
            want[i] = lw
    return want, markers


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("style", sorted(STYLES))
def test_plain_text_end_marker_is_learned_in_full_tokens(toks, name, style, caplog):
    template, header, marker, last_marker, next_header = STYLES[style]
    tok = make(toks, name, template)
    with caplog.at_level(logging.WARNING):
        s = encode_chat(tok, MSGS)
    assert "will not learn to stop" not in caplog.text
    text = tok.apply_chat_template(MSGS, tokenize=False)
    ids, offs = spans(tok, text)
    assert tok.decode(s.input_ids) == text and s.input_ids == ids
    want, markers = expected(tok, text, header, marker, last_marker)
    got = {i: w for i, (lab, w) in enumerate(zip(s.labels, s.loss_weights)) if lab != -100}
    assert set(got) == set(want), [(text[a:b], i in got) for i, (a, b) in enumerate(offs)]
    assert all(got[i] == pytest.approx(w) for i, w in want.items())
    # every character of every marker lies in a learned token ...
    for m0, m1 in markers:
        assert all(any(a <= ch < b for a, b in (offs[i] for i in got)) for ch in range(m0, m1))
    # ... and no learned token holds text of the next turn's header (whitespace after a marker may share its
    # last token: Qwen's ">\n\n")
    for h in [i for i in range(len(text)) if text.startswith(next_header, i)]:
        assert not overlapping(offs, h, h + len(next_header)) & set(got)


def test_boundary_tokens_are_exercised(toks):
    """The real Qwen3 tokenizer merges the content's last character with the marker's first (".</") and the
    marker's last with the separator after it (">\\n\\n"): both are learned whole; the header after is not."""
    tok = make(toks, "real_qwen3", VICUNA_TEXT.replace("'</s>'", "'</s>\n\n'"))
    s = encode_chat(tok, MSGS)
    pieces = [(tok.decode([t]), lab != -100) for t, lab in zip(s.input_ids, s.labels)]
    assert (".</", True) in pieces and (">\n\n", True) in pieces and ("USER", False) in pieces


@pytest.mark.parametrize("name", ["qwen3", "real_qwen3"])
def test_expand_turns_learns_each_turns_marker(toks, name):
    tok = make(toks, name, ALPACA_END)
    for k, s in enumerate(encode_chat(tok, MSGS, expand_turns=True)):
        text = tok.decode(s.input_ids)
        _, offs = spans(tok, text)
        c = text.find(ANSWERS[k][0])
        m = text.find("### End", c) + len("### End")
        start = text.rfind("### Response:\n", 0, c) + len("### Response:\n")
        assert {i for i, lab in enumerate(s.labels) if lab != -100} == overlapping(offs, start, m)


def test_template_without_any_marker_still_warns(toks, caplog):
    tok = make(toks, "real_qwen3", NO_MARKER)
    with caplog.at_level(logging.WARNING):
        s = encode_chat(tok, MSGS)
    assert "will not learn to stop" in caplog.text
    text = tok.decode(s.input_ids)
    _, offs = spans(tok, text)
    learned = {i for i, lab in enumerate(s.labels) if lab != -100}
    c = text.find("It is 84.")
    assert learned >= overlapping(offs, c, c + len("It is 84."))
    assert not learned & {i for i, (a, b) in enumerate(offs) if a >= c + len("It is 84.")}


def test_marker_merged_with_the_next_header_is_learned_and_reported(caplog, monkeypatch):
    """A tokenizer holding the marker's end and the next header's start as one token (here an added token
    "s>US"): the token is learned (else the marker is never written) and a warning says what it carries."""
    monkeypatch.setattr(chat, "_WARNED_MERGED", set())  # warned once per tokenizer id; ids are reused
    tok = tiny_tokenizer("qwen3")
    tok.add_tokens(["s>US"])
    tok.chat_template = VICUNA_TEXT
    with caplog.at_level(logging.WARNING):
        s = encode_chat(tok, MSGS)
    merged = tok.convert_tokens_to_ids("s>US")
    i = s.input_ids.index(merged)
    assert s.labels[i] == merged
    assert "as one token" in caplog.text and "'US'" in caplog.text
