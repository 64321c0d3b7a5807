"""encode_chat properties, checked against the canonical render through offset mappings.

The oracle below shares no code with distthink.data.chat: it renders with apply_chat_template, tokenises
with return_offsets_mapping, and finds each message's text with str.find (the test conversations use unique
strings). What is learned is stated per family from reading the templates (header = context the model is
given at inference, eot = the token that ends an assistant turn).
"""

from __future__ import annotations

import pytest

from distthink.data.chat import ChatPolicy, encode_chat
from distthink.data.dataset import build_sft_dataset
from distthink.errors import DataError
from distthink.models.tiny import tiny_tokenizer

FAMILIES = ["qwen3", "llama3", "deepseek_r1", "plain", "instruction", "real_qwen3"]
HEADER = {"qwen3": "<|im_start|>assistant\n", "real_qwen3": "<|im_start|>assistant\n",
          "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "deepseek_r1": "<｜Assistant｜>",
          "plain": "Assistant:", "instruction": "### Response:\n"}
EOT = {"qwen3": "<|im_end|>", "real_qwen3": "<|im_end|>", "llama3": "<|eot_id|>",
       "deepseek_r1": "<｜end▁of▁sentence｜>", "plain": "</s>", "instruction": "</s>"}
# Families whose template renders reasoning_content itself; for the others encode_chat inlines it.
RENDERS_REASONING = {"qwen3", "real_qwen3", "deepseek_r1"}

SYSTEM, U1, U2 = "You are terse.", "What is 12 + 30?", "Double it."
A1, R1 = "The answer is 42.", "Add tens: 12 + 30 = 42."
A2, R2 = "It is 84.", "Then 42 * 2 = 84."


def conv(lw2: float = 0.5):
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": U1},
            {"role": "assistant", "content": A1, "reasoning_content": R1},
            {"role": "user", "content": U2},
            {"role": "assistant", "content": A2, "reasoning_content": R2, "loss_weight": lw2}]


@pytest.fixture(scope="module")
def toks(qwen3_tokenizer):
    out = {f: tiny_tokenizer(f) for f in FAMILIES if f != "real_qwen3"}
    out["real_qwen3"] = qwen3_tokenizer
    return out


def template_view(family, messages, think):
    """The messages the template is expected to see (documented convention of encode_chat)."""
    out = []
    for m in messages:
        d = {"role": m["role"], "content": m["content"]}
        r = m.get("reasoning_content")
        if m["role"] == "assistant" and r is not None and think != "drop":
            if family in RENDERS_REASONING:
                d["reasoning_content"] = r
            else:
                d["content"] = f"<think>\n{r}\n</think>\n\n{m['content']}"
        out.append(d)
    return out


def offsets(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def overlapping(offs, start, end):
    return {i for i, (a, b) in enumerate(offs) if b > a and a < end and b > start}


def expected_labels(family, tok, text, turns, think, think_weight, enable_thinking_off=False):
    """turns: [(content, reasoning_or_None, loss_weight)] of trained assistant turns in order.
    Returns {token index: weight} of learned tokens."""
    ids, offs = offsets(tok, text)
    want: dict[int, float] = {}
    for content, reasoning, lw in turns:
        c = text.find(content)
        assert c >= 0 and text.count(content) == 1, (content, text)
        eot_end = c + len(content) + len(EOT[family])
        assert text.startswith(EOT[family], c + len(content)), text[c:]
        r = text.find(reasoning) if reasoning else -1
        header = HEADER[family]
        if family == "deepseek_r1" and r >= 0:
            header = "<｜Assistant｜><think>\n"   # its generation prompt opens the think block
        off_header = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the generation prompt in that mode
        if enable_thinking_off and family in ("qwen3", "real_qwen3") and text[:c].endswith(off_header):
            header = off_header
        h = text.rfind(header, 0, r if r >= 0 else c)
        assert h >= 0
        out_start = h + len(header)
        for i in overlapping(offs, c, eot_end):
            want[i] = lw
        between = overlapping(offs, out_start, c) - overlapping(offs, c, eot_end)
        if r >= 0 or "<think>" in text[out_start:c]:  # the think block (reasoning, or an empty block the template adds)
            for i in between:
                if think != "mask":
                    want[i] = lw * think_weight
        else:  # e.g. the space after "Assistant:" that the model generates itself
            for i in between:
                want[i] = lw
    return want


def check(family, tok, messages, sample, turns, think="supervise", think_weight=1.0, kwargs=None,
          enable_thinking_off=False):
    text = tok.apply_chat_template(template_view(family, messages, think), tokenize=False, **(kwargs or {}))
    # 1. canonical render, character for character, and the same ids as tokenising it
    assert tok.decode(sample.input_ids) == text
    ids, _ = offsets(tok, text)
    assert sample.input_ids == ids
    want = expected_labels(family, tok, text, turns, think, think_weight, enable_thinking_off)
    got = {i: w for i, (lab, w) in enumerate(zip(sample.labels, sample.loss_weights)) if lab != -100}
    assert set(got) == set(want), _diff(tok, sample, want)
    for i, w in want.items():
        assert got[i] == pytest.approx(w), (i, tok.decode([sample.input_ids[i]]))
        assert sample.labels[i] == sample.input_ids[i]
    assert all(w == 0.0 for lab, w in zip(sample.labels, sample.loss_weights) if lab == -100)
    return text


def _diff(tok, sample, want):
    return "".join(("[" if i in want else "") + ("{" if lab != -100 else "") + tok.decode([t])
                   + ("}" if lab != -100 else "") + ("]" if i in want else "")
                   for i, (t, lab) in enumerate(zip(sample.input_ids, sample.labels)))


def visible_turns(family, think, lw2=0.5):
    """Which reasoning the template shows: Qwen3 and R1 drop history reasoning; inlined families keep all."""
    keep_first = family not in RENDERS_REASONING and think != "drop"
    keep_last = think != "drop"
    return [(A1, R1 if keep_first else None, 1.0), (A2, R2 if keep_last else None, lw2)]


# ---------------------------------------------------------------------------------------------------------
# 1-3, 5: canonical render, exact supervision, think policies, weights — every family.

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("think", ["supervise", "mask", "drop"])
def test_properties_every_family(toks, family, think):
    tok = toks[family]
    s = encode_chat(tok, conv(), think=think, think_weight=0.25)
    text = check(family, tok, conv(), s, visible_turns(family, think), think=think, think_weight=0.25)
    # no token of system/user text is learned, and no role header token
    _, offs = offsets(tok, text)
    learned = {i for i, lab in enumerate(s.labels) if lab != -100}
    for forbidden in (SYSTEM, U1, U2):
        p = text.find(forbidden)
        assert not (overlapping(offs, p, p + len(forbidden)) & learned)
    if think == "drop":
        assert R1 not in text and R2 not in text
    if family in RENDERS_REASONING and think != "drop":
        assert R1 not in text  # history reasoning dropped by these templates...
        assert R2 in text      # ...the last turn keeps it


@pytest.mark.parametrize("family", ["qwen3", "real_qwen3", "deepseek_r1", "llama3"])
def test_think_tags_supervised_with_reasoning(toks, family):
    tok = toks[family]
    s = encode_chat(tok, conv(lw2=1.0), think_weight=0.5)
    text = tok.decode(s.input_ids)
    _, offs = offsets(tok, text)
    close = text.rfind("</think>")
    tag_tokens = overlapping(offs, close, close + len("</think>"))
    assert tag_tokens and all(s.labels[i] != -100 and s.loss_weights[i] == 0.5 for i in tag_tokens)
    r = text.find(R2)
    assert all(s.loss_weights[i] == 0.5 for i in overlapping(offs, r, r + len(R2)))
    # think_weight 0 == mask for the reasoning tokens
    s0 = encode_chat(tok, conv(lw2=1.0), think_weight=0.0)
    assert all(s0.labels[i] == -100 for i in overlapping(offs, r, r + len(R2)))


def test_pad_equals_eos_is_still_learned(toks):
    tok = toks["llama3"]
    assert tok.pad_token_id == tok.eos_token_id
    s = encode_chat(tok, conv())
    eot_positions = [i for i, t in enumerate(s.input_ids) if t == tok.eos_token_id]
    # every <|eot_id|> that closes an assistant turn is learned; those closing system/user are not
    text = tok.decode(s.input_ids)
    _, offs = offsets(tok, text)
    learned_eot = [i for i in eot_positions if s.labels[i] == tok.eos_token_id]
    ends = [text.find(A1) + len(A1), text.find(A2) + len(A2)]
    assert sorted(offs[i][0] for i in learned_eot) == ends
    assert len(eot_positions) == 5


def test_loss_weight_zero_turn_not_learned(toks):
    tok = toks["qwen3"]
    s = encode_chat(tok, conv(lw2=0.0))
    check("qwen3", tok, conv(lw2=0.0), s, [(A1, None, 1.0)])


# ---------------------------------------------------------------------------------------------------------
# enable_thinking

def test_enable_thinking_false_tiny_qwen3(toks):
    tok = toks["qwen3"]
    s = encode_chat(tok, conv(), enable_thinking=False)
    text = check("qwen3", tok, conv(), s, [(A1, None, 1.0), (A2, None, 0.5)], kwargs={"enable_thinking": False},
                 enable_thinking_off=True)
    assert "<think>\n\n</think>\n\n" + A2 in text and R2 not in text


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_real_qwen3_empty_think_block(toks, enable_thinking):
    """Real Qwen3 adds an empty think block to the last turn when it has no reasoning. With thinking on, the
    model generates that block itself (learned); with enable_thinking=False it is part of the generation
    prompt (context)."""
    tok = toks["real_qwen3"]
    msgs = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}]
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    s = encode_chat(tok, msgs, **kw)
    text = check("real_qwen3", tok, msgs, s, [(A1, None, 1.0)], kwargs=kw,
                 enable_thinking_off=enable_thinking is False)
    assert "<think>\n\n</think>\n\n" + A1 in text
    think_tok = tok.convert_tokens_to_ids("<think>")
    i = s.input_ids.index(think_tok)
    assert (s.labels[i] != -100) == (enable_thinking is None)


def test_enable_thinking_per_sample(toks, tmp_path):
    tok = toks["qwen3"]
    import json

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": conv(), "enable_thinking": False}) + "\n"
                 + json.dumps({"messages": conv()}) + "\n")
    samples, report = build_sft_dataset(p, tok, ChatPolicy(enable_thinking=True))
    off = tok.apply_chat_template(template_view("qwen3", conv(), "supervise"), tokenize=False, enable_thinking=False)
    on = tok.apply_chat_template(template_view("qwen3", conv(), "supervise"), tokenize=False, enable_thinking=True)
    assert off != on
    assert tok.decode(samples[0].input_ids) == off
    assert tok.decode(samples[1].input_ids) == on


# ---------------------------------------------------------------------------------------------------------
# 4. expand_turns

@pytest.mark.parametrize("family", ["qwen3", "real_qwen3", "deepseek_r1", "llama3"])
def test_expand_turns(toks, family):
    tok = toks[family]
    msgs = conv()
    out = encode_chat(tok, msgs, expand_turns=True)
    assert isinstance(out, list) and len(out) == 2
    for s, k, (content, reasoning, lw) in zip(out, (2, 4), [(A1, R1, 1.0), (A2, R2, 0.5)]):
        prefix = msgs[:k + 1]
        text = check(family, tok, prefix, s, [(content, reasoning, lw)])
        assert reasoning in text  # each turn keeps its own reasoning, as at inference
        assert s.meta["turn"] == k
    # Qwen3: in the expanded sample of turn 2, turn 1's reasoning is gone (as the model sees it)
    if family in RENDERS_REASONING:
        assert R1 not in tok.decode(out[1].input_ids)


def test_expand_turns_with_unmask_trains_each_message_once(toks):
    tok = toks["qwen3"]
    out = encode_chat(tok, conv(), expand_turns=True, unmask=True)
    texts = [tok.decode(s.input_ids) for s in out]
    learned = ["".join(tok.decode([t]) for t, lab in zip(s.input_ids, s.labels) if lab != -100) for s in out]
    assert U1 in learned[0] and U2 not in learned[0]
    assert U2 in learned[1] and U1 not in learned[1] and A1 not in learned[1]
    assert SYSTEM not in "".join(learned) and len(texts) == 2


# ---------------------------------------------------------------------------------------------------------
# unmask

@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_unmask_trains_every_non_system_role(toks, family):
    tok = toks[family]
    msgs = conv()
    s = encode_chat(tok, msgs, unmask=True)
    text = tok.decode(s.input_ids)
    _, offs = offsets(tok, text)
    learned = {i for i, lab in enumerate(s.labels) if lab != -100}
    for u in (U1, U2):
        p = text.find(u)
        assert overlapping(offs, p, p + len(u) + len(EOT[family])) <= learned
    p = text.find(SYSTEM)
    assert not overlapping(offs, p, p + len(SYSTEM) + len(EOT[family])) & learned
    hdr = "<|im_start|>user\n" if family == "qwen3" else "<|start_header_id|>user<|end_header_id|>\n\n"
    for start in [i for i in range(len(text)) if text.startswith(hdr, i)]:
        assert not overlapping(offs, start, start + len(hdr)) & learned


# ---------------------------------------------------------------------------------------------------------
# 6. truncation

def test_truncation_policies(toks):
    tok = toks["qwen3"]
    full = encode_chat(tok, conv())
    L = len(full) - 7
    right = encode_chat(tok, conv(), max_length=L, truncation="truncate_right")
    assert right.input_ids == full.input_ids[:L] and right.labels == full.labels[:L]
    assert right.loss_weights == full.loss_weights[:L] and right.meta["truncated"] == "truncate_right"
    left = encode_chat(tok, conv(), max_length=L, truncation="truncate_left")
    assert left.input_ids == full.input_ids[-L:] and left.labels == full.labels[-L:]
    with pytest.raises(DataError) as e:
        encode_chat(tok, conv(), max_length=L, truncation="drop")
    assert e.value.reason == "too_long"
    assert encode_chat(tok, conv(), max_length=len(full), truncation="drop").input_ids == full.input_ids


def test_zero_learned_after_truncation_is_counted(toks):
    tok = toks["qwen3"]
    first_learned = next(i for i, lab in enumerate(encode_chat(tok, conv()).labels) if lab != -100)
    with pytest.raises(DataError) as e:
        encode_chat(tok, conv(), max_length=first_learned, truncation="truncate_right")
    assert e.value.reason == "no_learned_tokens"
    records = [{"messages": conv()}, {"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "ok"}]}]
    samples, report = build_sft_dataset(records, tok, ChatPolicy(max_length=first_learned), on_error="skip")
    assert len(samples) == 1 and report.skipped == {"no_learned_tokens": 1}
    assert "no_learned_tokens" in report.summary()
    with pytest.raises(DataError):
        build_sft_dataset(records, tok, ChatPolicy(max_length=first_learned), on_error="raise")


# ---------------------------------------------------------------------------------------------------------
# whitespace-altering templates and inline <think>

@pytest.mark.parametrize("family", ["qwen3", "llama3", "real_qwen3"])
def test_whitespace_is_rendered_as_the_template_does(toks, family):
    tok = toks[family]
    msgs = [{"role": "user", "content": "  spaced question \n"},
            {"role": "assistant", "content": "\n  spaced answer  \n", "reasoning_content": "\n spaced thought \n"}]
    s = encode_chat(tok, msgs)
    text = tok.apply_chat_template(template_view(family, msgs, "supervise"), tokenize=False)
    assert tok.decode(s.input_ids) == text
    _, offs = offsets(tok, text)
    a = text.find("spaced answer")
    eot = text.find(EOT[family], a)
    learned = {i for i, lab in enumerate(s.labels) if lab != -100}
    assert overlapping(offs, a, eot + len(EOT[family])) <= learned
    q = text.find("spaced question")
    assert not overlapping(offs, q, q + len("spaced question")) & learned


@pytest.mark.parametrize("family", ["qwen3", "real_qwen3", "llama3"])
def test_inline_think_in_content(toks, family):
    tok = toks[family]
    msgs = [{"role": "user", "content": U1},
            {"role": "assistant", "content": f"<think>\n{R1}\n</think>\n\n{A1}"}]
    for think in ("supervise", "mask"):
        s = encode_chat(tok, msgs, think=think)
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert tok.decode(s.input_ids) == text
        _, offs = offsets(tok, text)
        r = text.find(R1)
        rt = overlapping(offs, r, r + len(R1))
        assert all((s.labels[i] != -100) == (think == "supervise") for i in rt)
        a = text.find(A1)
        assert all(s.labels[i] != -100 for i in overlapping(offs, a, a + len(A1)))
    s = encode_chat(tok, msgs, think="drop")
    assert R1 not in tok.decode(s.input_ids) and A1 in tok.decode(s.input_ids)


def test_tool_role_and_unmask_real_qwen3(toks):
    tok = toks["real_qwen3"]
    msgs = [{"role": "user", "content": "Call the adder."},
            {"role": "assistant", "content": "Calling adder now."},
            {"role": "tool", "content": "result=5"},
            {"role": "assistant", "content": "The adder says 5.", "reasoning_content": "Tool gave 5."}]
    s = encode_chat(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(s.input_ids) == text
    _, offs = offsets(tok, text)
    learned = {i for i, lab in enumerate(s.labels) if lab != -100}
    p = text.find("result=5")
    assert not overlapping(offs, p, p + 8) & learned
    for a in ("Calling adder now.", "The adder says 5.", "Tool gave 5."):
        p = text.find(a)
        assert overlapping(offs, p, p + len(a)) <= learned


def test_policy_validation():
    from distthink.errors import ConfigError

    for bad in ({"think": "maybe"}, {"think_weight": -1}, {"truncation": "middle"}, {"max_length": 0},
                {"enable_thinking": "yes"}, {"template_kwargs": {"enable_thinking": True}}, {"nonsense": 1}):
        with pytest.raises(ConfigError):
            ChatPolicy.from_kwargs(**bad)


@pytest.mark.parametrize("family", ["qwen3", "deepseek_r1", "real_qwen3"])
def test_multibyte_text_split_across_tokens(toks, family):
    """Byte-level BPE splits multi-byte characters across tokens (several tokens share one character's
    offsets): the learned tokens still decode to exactly the assistant output."""
    tok = toks[family]
    msgs = [{"role": "user", "content": "日本語 🎉 café"},
            {"role": "assistant", "content": "🎉🎉 答え ok", "reasoning_content": "考え 🤔"}]
    s = encode_chat(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(s.input_ids) == text
    learned = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100])
    start = text.rindex(HEADER[family] + ("<think>\n" if family == "deepseek_r1" else "")) + len(HEADER[family])
    start += len("<think>\n") if family == "deepseek_r1" else 0
    assert learned == text[start:text.rindex(EOT[family]) + len(EOT[family])]


def test_tokenizer_without_chat_template_is_a_config_error():
    from distthink.errors import ConfigError

    tok = tiny_tokenizer("qwen3")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        encode_chat(tok, conv())


def test_real_qwen3_tool_calls_are_learned(toks):
    """Text the template writes between the assistant content and its end-of-turn token (Qwen3's rendered
    tool calls) is generated by the model, so it is learned; the tool's response is not."""
    tok = toks["real_qwen3"]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    msgs = [{"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "content": "Calling.", "tool_calls": [call]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "It is 5."}]
    s = encode_chat(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(s.input_ids) == text
    learned = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100])
    first = text[text.index("Calling."):text.index("<|im_end|>", text.index("Calling.")) + len("<|im_end|>")]
    assert "<tool_call>" in first and learned.startswith(first)
    assert learned.count('"name": "add"') == 2 and "<tool_response>" not in learned
    assert learned.endswith("It is 5.<|im_end|>") and "Add 2 and 3." not in learned


def test_expand_turns_counts_turns_left_without_learned_tokens(toks):
    tok = toks["qwen3"]
    out = encode_chat(tok, conv(), expand_turns=True)
    # the second turn's sample is longer; cut it just before its first learned token
    L = next(i for i, lab in enumerate(out[1].labels) if lab != -100)
    assert L >= len(out[0])
    kept = encode_chat(tok, conv(), expand_turns=True, max_length=L)
    assert len(kept) == 1 and kept[0].input_ids == out[0].input_ids and kept[0].meta["skipped_turns"] == 1
    samples, report = build_sft_dataset([{"messages": conv()}], tok, ChatPolicy(expand_turns=True, max_length=L),
                                        on_error="skip")
    assert len(samples) == 1 and report.skipped == {"no_learned_tokens": 1}
    with pytest.raises(DataError):
        build_sft_dataset([{"messages": conv()}], tok, ChatPolicy(expand_turns=True, max_length=L))


def test_drop_reasoning_only_turn(toks):
    tok = toks["qwen3"]
    msgs = conv()
    msgs[2] = {"role": "assistant", "content": "", "reasoning_content": R1}
    s = encode_chat(tok, msgs, think="drop")
    learned = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100])
    assert learned == "<think>\n\n</think>\n\n" + A2 + "<|im_end|>"  # only the turn that still has an answer
    with pytest.raises(DataError) as e:
        encode_chat(tok, msgs[:3], think="drop")
    assert e.value.reason == "no_learned_tokens"
    # supervise keeps a reasoning-only last turn: think block + end-of-turn
    s = encode_chat(tok, msgs[:3])
    learned = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100])
    assert learned == f"<think>\n{R1}\n</think>\n\n<|im_end|>"


def test_text_is_normalised_like_the_tokenizer(toks):
    """Real Qwen3 NFC-normalises text; the render is built from normalised messages so decode reproduces it."""
    import unicodedata

    tok = toks["real_qwen3"]
    msgs = [{"role": "user", "content": "cafe\u0301?"}, {"role": "assistant", "content": "Cafe\u0301 ok"}]
    s = encode_chat(tok, msgs)
    nfc = [dict(m, content=unicodedata.normalize("NFC", m["content"])) for m in msgs]
    assert tok.decode(s.input_ids) == tok.apply_chat_template(nfc, tokenize=False)
    assert tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100]).endswith("Café ok<|im_end|>")


def test_prepare_messages_is_what_the_template_sees(toks):
    from distthink.data.chat import prepare_messages

    for family in ("llama3", "qwen3"):
        tok = toks[family]
        for think in ("supervise", "drop"):
            s = encode_chat(tok, conv(), think=think)
            prepared = prepare_messages(tok, conv(), ChatPolicy(think=think))
            assert prepared == template_view(family, conv(), think)
            assert tok.decode(s.input_ids) == tok.apply_chat_template(prepared, tokenize=False)


def test_the_oracle_catches_wrong_labels(toks):
    """The property check is not vacuous: one unlearned end-of-turn token, one learned header token, or one
    wrong weight each make it fail."""
    tok = toks["qwen3"]
    good = encode_chat(tok, conv(), think_weight=0.25)
    check("qwen3", tok, conv(), good, visible_turns("qwen3", "supervise"), think_weight=0.25)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    last_eot = max(i for i, t in enumerate(good.input_ids) if t == eot and good.labels[i] != -100)
    header = next(i for i, t in enumerate(good.input_ids) if t == tok.convert_tokens_to_ids("<|im_start|>"))
    for mutate in ("unlearn_eot", "learn_header", "weight"):
        bad = encode_chat(tok, conv(), think_weight=0.25)
        if mutate == "unlearn_eot":
            bad.labels[last_eot], bad.loss_weights[last_eot] = -100, 0.0
        elif mutate == "learn_header":
            bad.labels[header], bad.loss_weights[header] = bad.input_ids[header], 1.0
        else:
            bad.loss_weights[last_eot] = 1.0
        with pytest.raises(AssertionError):
            check("qwen3", tok, conv(), bad, visible_turns("qwen3", "supervise"), think_weight=0.25)
