"""Sample validation: each rejected case names file, line, field and fix; on_error=skip counts by reason."""

from __future__ import annotations

import json

import pytest

from distthink.data.chat import ChatPolicy
from distthink.data.dataset import audit_labels, build_sft_dataset
from distthink.errors import DataError, LabelAuditError
from distthink.models.tiny import tiny_tokenizer

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 = 4."}]}

# (record, reason, field named in the message)
BAD = [
    ({"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "x"}]},
     "non_string_content", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 7}]},
     "non_string_reasoning", "messages[1].reasoning_content"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "unknown_role", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}, {"role": "assistant", "content": "a"}]},
     "reasoning_on_non_assistant", "messages[0].reasoning_content"),
    ({"messages": []}, "empty_conversation", "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "empty_assistant", "messages[1]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>oops answer"}]},
     "unbalanced_think", "messages[1].content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a</think> b"}]},
     "unbalanced_think", "messages[1].content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": -1}]},
     "bad_loss_weight", "messages[1].loss_weight"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "unmask": "yes"},
     "bad_flag", "unmask"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_trainable_turn", "messages"),
    ({"text": "pre-rendered"}, "unknown_form", None),
    ({"prompt": 3, "completion": "x"}, "non_string_content", "prompt"),
    ({"instruction": "do", "response": None}, "non_string_content", "response"),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("qwen3")


@pytest.mark.parametrize("record,reason,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_each_error_names_file_line_field_fix(tmp_path, tok, record, reason, field):
    p = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, record])
    with pytest.raises(DataError) as e:
        build_sft_dataset(p, tok, ChatPolicy())
    err = e.value
    msg = str(err)
    assert err.reason == reason
    assert str(p) in msg and "line 3" in msg and "Fix:" in msg
    if field is not None:
        assert err.field == field and f"field '{field}'" in msg


def test_skip_counts_by_reason(tmp_path, tok):
    records = [GOOD] + [b[0] for b in BAD] + [GOOD]
    p = write_jsonl(tmp_path / "data.jsonl", records)
    with open(p, "a") as f:
        f.write("{not json\n")
    samples, report = build_sft_dataset(p, tok, ChatPolicy(), on_error="skip")
    assert len(samples) == 2 and report.records == len(records) + 1
    expected: dict[str, int] = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    expected["invalid_json"] = 1
    assert dict(report.skipped) == expected
    text = report.summary()
    for reason in expected:
        assert reason in text


def test_forms_and_file_types(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [GOOD, {"prompt": "Q: hi\nA:", "completion": " hello"},
               {"instruction": "Say hi", "input": "to Bob", "response": "Hi Bob"},
               {"prompt": [{"role": "user", "content": "q1"}], "completion": [{"role": "assistant", "content": "a1"}]}]
    a = build_sft_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok)[0]
    (tmp_path / "d.json").write_text(json.dumps(records))
    b = build_sft_dataset(tmp_path / "d.json", tok)[0]
    c = build_sft_dataset(records, tok)[0]
    assert [s.input_ids for s in a] == [s.input_ids for s in b] == [s.input_ids for s in c]
    pq.write_table(pa.Table.from_pylist([GOOD, {"messages": [{"role": "user", "content": "x"},
                                                             {"role": "assistant", "content": "y"}]}]),
                   tmp_path / "d.parquet")
    d = build_sft_dataset(tmp_path / "d.parquet", tok)[0]
    assert d[0].input_ids == a[0].input_ids
    # prompt/completion text form: completion + eos learned, prompt not
    s = a[1]
    learned = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100])
    assert learned == " hello" + tok.eos_token
    # instruction form with the default format; the input is kept
    s = a[2]
    text = tok.decode(s.input_ids)
    assert text == "### Instruction:\nSay hi\n\nto Bob\n\n### Response:\nHi Bob" + tok.eos_token
    assert tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100]) == "Hi Bob" + tok.eos_token
    # custom instruction format
    s = build_sft_dataset([records[2]], tok, ChatPolicy(instruction_format="Q: {instruction} ({input})\nA: "))[0][0]
    assert tok.decode(s.input_ids).startswith("Q: Say hi (to Bob)\nA: Hi Bob")
    # conversational prompt/completion trains only the completion's assistant turns
    s = a[3]
    assert "a1" in tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100])


def test_label_audit_refuses_full_sequence_loss(tok):
    records = [{"prompt": "", "completion": "User: hi Assistant: hello"}] * 3
    with pytest.raises(LabelAuditError) as e:
        build_sft_dataset(records, tok)
    assert "allow_full_sequence_loss" in str(e.value)
    samples, report = build_sft_dataset(records, tok, ChatPolicy(allow_full_sequence_loss=True))
    assert report.full_sequence_samples == 3 and all(s.labels == s.input_ids for s in samples)
    # a normal dataset passes the audit (and the audit can fail: the fully-learned samples above are found)
    good, _ = build_sft_dataset([GOOD] * 3, tok)
    assert audit_labels(good) == 0 and audit_labels(samples, allow_full_sequence_loss=True) == 3


def test_bundled_sample_data_encodes_cleanly_for_every_family():
    from distthink.data.sample_data import EVAL_PATH, TRAIN_PATH
    from distthink.models.tiny import FAMILIES

    for fam in FAMILIES:
        t = tiny_tokenizer(fam)
        samples, report = build_sft_dataset(TRAIN_PATH, t, ChatPolicy())
        assert report.num_skipped == 0 and len(samples) == 300
        assert 0.2 < report.learned_tokens / report.tokens < 0.9
    _, report = build_sft_dataset(EVAL_PATH, tiny_tokenizer("qwen3"), ChatPolicy())
    assert report.samples == 60
