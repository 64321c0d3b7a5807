"""The two known failure modes of naive labelling methods, shown on real templates, and encode_chat exact
on the same inputs.

- Sentinel wrapping: wrap each assistant content in markers, render, find and delete the markers. The
  markers shield the content from the template's strip/trim, so the result is not the canonical render.
- Prefix diffing: render messages[:i] and messages[:i+1], take the difference as turn i. Qwen3 renders a
  turn's reasoning only while it is after the last user query, so the prefix render is not a prefix of the
  full render and the spans point at the wrong text.
"""

from __future__ import annotations

import pytest

from distthink.data.chat import encode_chat
from distthink.models.tiny import tiny_tokenizer

OPEN, CLOSE = "@@SENT_OPEN@@", "@@SENT_CLOSE@@"


def naive_sentinel(tok, messages):
    wrapped = [dict(m, content=OPEN + m["content"] + CLOSE) if m["role"] == "assistant" else m for m in messages]
    text = tok.apply_chat_template(wrapped, tokenize=False)
    spans, out, pos = [], "", 0
    while True:
        a = text.find(OPEN, pos)
        if a < 0:
            out += text[pos:]
            break
        b = text.find(CLOSE, a)
        out += text[pos:a]
        spans.append((len(out), len(out) + b - a - len(OPEN)))
        out += text[a + len(OPEN):b]
        pos = b + len(CLOSE)
    return out, spans


def naive_prefix_diff(tok, messages):
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            a = len(tok.apply_chat_template(messages[:i], tokenize=False)) if i else 0
            b = len(tok.apply_chat_template(messages[:i + 1], tokenize=False))
            spans.append((a, b))
    return full, spans


def learned_text(tok, sample):
    return "".join(tok.decode([t]) for t, lab in zip(sample.input_ids, sample.labels) if lab != -100)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_sentinel_wrapping_breaks_whitespace_stripping(family):
    tok = tiny_tokenizer(family)
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "\n  Hi there.  \n"}]
    canonical = tok.apply_chat_template(msgs, tokenize=False)
    naive_text, _ = naive_sentinel(tok, msgs)
    assert naive_text != canonical                 # the naive method changes the render...
    assert "\n  Hi there.  \n" in naive_text and "\n  Hi there.  \n" not in canonical
    s = encode_chat(tok, msgs)                     # ...encode_chat does not
    assert tok.decode(s.input_ids) == canonical
    assert "Hi there." in learned_text(tok, s)


@pytest.mark.parametrize("family", ["real_qwen3", "qwen3"])
def test_prefix_diff_breaks_on_history_reasoning_drop(qwen3_tokenizer, family):
    tok = qwen3_tokenizer if family == "real_qwen3" else tiny_tokenizer("qwen3")
    msgs = [{"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "It is 2.", "reasoning_content": "One plus one is two."},
            {"role": "user", "content": "And 2 + 2?"},
            {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two plus two is four."}]
    full, spans = naive_prefix_diff(tok, msgs)
    prefix = tok.apply_chat_template(msgs[:2], tokenize=False)
    assert not full.startswith(prefix)             # not prefix-stable
    # The naive span of turn 1 in the full render is not turn 1's text: it runs into the next user turn.
    a, b = spans[0]
    assert "And 2 + 2?" in full[a:b]
    # encode_chat: exact render, turn 1 content learned without its (dropped) reasoning, turn 2 with it.
    s = encode_chat(tok, msgs)
    assert tok.decode(s.input_ids) == full
    learned = learned_text(tok, s)
    assert "It is 2." in learned and "It is 4." in learned and "Two plus two is four." in learned
    assert "One plus one" not in learned and "And 2 + 2?" not in learned and "What is 1 + 1?" not in learned


def test_adversarial_contents_do_not_confuse_alignment(qwen3_tokenizer):
    """Contents that look like template literals or role names must not be mislocated."""
    tok = qwen3_tokenizer
    msgs = [{"role": "system", "content": "assistant"},
            {"role": "user", "content": "assistant\n"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "assistant", "reasoning_content": "a"}]
    s = encode_chat(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(s.input_ids) == text
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    learned = [(a, b) for (a, b), lab in zip(enc["offset_mapping"], s.labels) if lab != -100]
    # learned characters: turn 1 "a<|im_end|>", turn 2 "<think>\na\n</think>\n\nassistant<|im_end|>"
    t1 = text.index("<|im_start|>assistant\na<|im_end|>") + len("<|im_start|>assistant\n")
    t2 = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    covered = "".join(text[a:b] for a, b in learned)
    assert covered == text[t1:t1 + len("a<|im_end|>")] + text[t2:text.rindex("<|im_end|>") + len("<|im_end|>")]


def test_template_branching_on_content_edges(qwen3_tokenizer):
    """Real Qwen3 treats a user message that starts with <tool_response> and ends with </tool_response> as a
    tool result, which moves the 'last query' and so changes which reasoning is rendered. Opaque placeholders
    would take the other branch; encode_chat falls back to placeholders that keep the value's edges."""
    tok = qwen3_tokenizer
    msgs = [{"role": "user", "content": "Look it up."},
            {"role": "assistant", "content": "Searching.", "reasoning_content": "Need the tool."},
            {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
            {"role": "assistant", "content": "It is 42.", "reasoning_content": "The tool said 42."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert "Need the tool." in text  # the first turn is after the last *query*, so its reasoning renders
    s = encode_chat(tok, msgs)
    assert tok.decode(s.input_ids) == text
    learned = learned_text(tok, s)
    for part in ("Need the tool.", "Searching.", "The tool said 42.", "It is 42."):
        assert part in learned
    assert "42\n</tool_response>" not in learned and "Look it up." not in learned
    # attribution is exact, not just coverage: under think=mask the reasoning of both turns is context
    masked = learned_text(tok, encode_chat(tok, msgs, think="mask"))
    assert "Need the tool." not in masked and "The tool said 42." not in masked
    assert "Searching." in masked and "It is 42." in masked
