"""encode_chat on templates in other popular styles (written here for the tests): nothing in the encoder is
specific to them. Oracle: canonical render + offsets + str.find, and for a template with {% generation %}
markers, transformers' own assistant mask."""

from __future__ import annotations

import logging

import pytest

from distthink.data.chat import encode_chat
from distthink.data.dataset import build_sft_dataset
from distthink.errors import DataError
from distthink.models.tiny import tiny_tokenizer

MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content + '\n\n' }}"
           "{% elif m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
           "{% elif m.role == 'assistant' %}{{ m.content + eos_token }}{% endif %}{% endfor %}")
GEMMA = ("{{ bos_token }}{% if messages[0].role == 'system' %}{% set first = messages[0].content + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
         "{% endif %}{% for m in loop_messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
         "{{ '<start_of_turn>' + role + '\n' + ((first if loop.first else '') + m.content) | trim"
         " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3_GEN = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}"
            "{{ m.content + '<|end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
            "{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
UPPER = ("{% for m in messages %}{{ '<|' + m.role + '|>' + (m.content | upper if m.role == 'assistant' else m.content)"
         " + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
R1_STRICT = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '<|User|>' + m.content }}"
             "{% elif m.role == 'assistant' %}{% set c = m.content %}{% if '</think>' in c %}"
             "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|Assistant|>' + c + eos_token }}{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{% endif %}")
LLAMA31 = ("{{- bos_token }}{%- set date_string = strftime_now('%d %b %Y') %}"
           "{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}"
           "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
           "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
           "{{- 'Today Date: ' + date_string + '\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
           "{%- for message in messages %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n'"
           " + message.content | trim + '<|eot_id|>' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
TWICE = "{% for m in messages %}{{ m.content }}{{ m.content }}{{ eos_token }}{% endfor %}"

SPECIALS = ["[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>",
            "<|end|>", "<|User|>", "<|Assistant|>"]

MSGS = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "Double it."},
        {"role": "assistant", "content": "It is 84."}]


def make_tok(template):
    tok = tiny_tokenizer("llama3" if template is LLAMA31 else "plain")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = template
    return tok


def learned_set(sample):
    return {i for i, lab in enumerate(sample.labels) if lab != -100}


def oracle(tok, text, turns):
    """turns: [(header, rendered content, eot)] -> token indices that must be learned."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    want = set()
    for header, content, eot in turns:
        c = text.find(content)
        assert c >= 0 and text.startswith(eot, c + len(content))
        start = text.rfind(header, 0, c) + len(header) if header else c
        end = c + len(content) + len(eot)
        want |= {i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start}
    return want


@pytest.mark.parametrize("name,template,turns", [
    ("mistral", MISTRAL, [("[/INST]", "The answer is 42.", "</s>"), ("[/INST]", "It is 84.", "</s>")]),
    ("gemma", GEMMA, [("<start_of_turn>model\n", "The answer is 42.", "<end_of_turn>"),
                      ("<start_of_turn>model\n", "It is 84.", "<end_of_turn>")]),
    ("phi3_generation", PHI3_GEN, [("<|assistant|>\n", "The answer is 42.", "<|end|>"),
                                   ("<|assistant|>\n", "It is 84.", "<|end|>")]),
    ("llama31", LLAMA31, [("<|start_header_id|>assistant<|end_header_id|>\n\n", "The answer is 42.", "<|eot_id|>"),
                          ("<|start_header_id|>assistant<|end_header_id|>\n\n", "It is 84.", "<|eot_id|>")]),
    ("upper", UPPER, [("<|assistant|>", "THE ANSWER IS 42.", "<|end|>"), ("<|assistant|>", "IT IS 84.", "<|end|>")]),
])
def test_other_template_styles(name, template, turns):
    tok = make_tok(template)
    s = encode_chat(tok, MSGS)
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert tok.decode(s.input_ids) == text
    assert learned_set(s) == oracle(tok, text, turns)
    for forbidden in ("Be brief.", "What is 12 + 30?", "Double it."):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        p = text.find(forbidden)
        assert not {i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < p + len(forbidden) and b > p} \
            & learned_set(s)


def test_agrees_with_transformers_generation_mask():
    """For a template with {% generation %} markers, our labels equal transformers' assistant mask."""
    tok = make_tok(PHI3_GEN)
    out = tok.apply_chat_template(MSGS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    s = encode_chat(tok, MSGS)
    assert s.input_ids == list(out["input_ids"])
    assert [lab != -100 for lab in s.labels] == [bool(x) for x in out["assistant_masks"]]


def test_template_that_drops_final_reasoning_is_reported(caplog):
    tok = make_tok(R1_STRICT)
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."}]
    with caplog.at_level(logging.WARNING):
        s = encode_chat(tok, msgs)
    assert "Greet." not in tok.decode(s.input_ids)
    assert s.meta["reasoning_not_rendered"] is True
    assert "does not render the reasoning" in caplog.text
    _, report = build_sft_dataset([{"messages": msgs}] * 2, tok)
    assert report.reasoning_not_rendered == 2 and "not trained" in report.summary()


def test_template_rendering_a_trained_message_twice_is_a_clear_error():
    tok = make_tok(TWICE)
    with pytest.raises(DataError) as e:
        encode_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert e.value.reason == "template_unaligned"


@pytest.mark.parametrize("template", [MISTRAL, GEMMA, PHI3_GEN, LLAMA31], ids=["mistral", "gemma", "phi3", "llama31"])
def test_reasoning_inlined_and_policies_on_other_templates(template):
    """These templates ignore reasoning_content: it is inlined as a <think> block (never silently lost) and
    the think policies apply to it."""
    tok = make_tok(template)
    msgs = [{"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "The answer is 42.", "reasoning_content": "Add tens and units."}]
    for think, reasoning_learned in (("supervise", True), ("mask", False)):
        s = encode_chat(tok, msgs, think=think)
        text = tok.decode(s.input_ids)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        r, a = text.find("Add tens and units."), text.find("The answer is 42.")
        assert 0 <= r < a
        rt = {i for i, (x, y) in enumerate(enc["offset_mapping"]) if x < r + 19 and y > r}
        at = {i for i, (x, y) in enumerate(enc["offset_mapping"]) if x < a + 17 and y > a}
        assert all((s.labels[i] != -100) == reasoning_learned for i in rt)
        assert all(s.labels[i] != -100 for i in at)
    s = encode_chat(tok, msgs, think="drop")
    assert "Add tens" not in tok.decode(s.input_ids)
