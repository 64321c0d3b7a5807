"""Inputs that go through the `datasets` library (CSV/TSV, save_to_disk folders) encode exactly like JSONL."""

import json

import pytest

from distthink.data.chat import ChatPolicy
from distthink.data.dataset import build_sft_dataset
from distthink.errors import DataError
from distthink.models.tiny import tiny_tokenizer

datasets = pytest.importorskip("datasets")

PAIRS = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(6)]
CHATS = [{"messages": [{"role": "user", "content": f"Say {w}."},
                       {"role": "assistant", "content": f"{w}.", "reasoning_content": f"The word is {w}."}]}
         for w in ("red", "green", "blue")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("qwen3")


def _ids(samples):
    return [(s.input_ids, s.labels, s.loss_weights) for s in samples]


def test_csv_and_tsv_match_jsonl(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    datasets.Dataset.from_list(PAIRS).to_csv(str(tmp_path / "pairs.csv"))
    datasets.Dataset.from_list(PAIRS).to_csv(str(tmp_path / "pairs.tsv"), sep="\t")
    ref, _ = build_sft_dataset(str(jsonl), tok, ChatPolicy())
    for name in ("pairs.csv", "pairs.tsv"):
        got, report = build_sft_dataset(str(tmp_path / name), tok, ChatPolicy())
        assert _ids(got) == _ids(ref), name
        assert report.records == len(PAIRS)


def test_save_to_disk_folder_with_messages(tmp_path, tok):
    folder = tmp_path / "chats"
    datasets.Dataset.from_list(CHATS).save_to_disk(str(folder))
    ref, _ = build_sft_dataset(CHATS, tok, ChatPolicy())
    got, _ = build_sft_dataset(str(folder), tok, ChatPolicy())
    assert _ids(got) == _ids(ref)


def test_bad_row_in_csv_names_the_row(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = PAIRS[:2] + [{"prompt": "ok?", "completion": None}]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match=r"bad\.csv.*(row|line) 3"):
        build_sft_dataset(str(tmp_path / "bad.csv"), tok, ChatPolicy())
    samples, report = build_sft_dataset(str(tmp_path / "bad.csv"), tok, ChatPolicy(), on_error="skip")
    assert len(samples) == 2 and sum(report.skipped.values()) == 1
