"""Load SFT records (JSONL / JSON / Parquet / anything `datasets` loads), validate, encode, audit.

    samples, report = build_sft_dataset("data.jsonl", tokenizer, ChatPolicy(), on_error="skip")
    print(report.summary())

Nothing is dropped silently: every skipped record (or expanded turn) is counted by reason in the report,
with the first few error messages kept verbatim.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import pyarrow.parquet as pq

from distthink.data.chat import ChatPolicy, encode_sample
from distthink.data.schema import validate_record
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.errors import ConfigError, DataError, LabelAuditError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


@dataclass
class DatasetReport:
    """Counts of what happened to each record while building a dataset."""

    source: str
    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)   # reason -> first error message
    tokens: int = 0
    learned_tokens: int = 0
    truncated: int = 0
    full_sequence_samples: int = 0
    reasoning_not_rendered: int = 0   # samples whose final turn's reasoning the template does not render

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))

    def summary(self) -> str:
        frac = self.learned_tokens / self.tokens if self.tokens else 0.0
        lines = [f"{self.source}: {self.records} records -> {self.samples} samples, {self.tokens} tokens "
                 f"({frac:.1%} learned), {self.truncated} truncated, {self.num_skipped} skipped"]
        if self.reasoning_not_rendered:
            lines.append(f"  warning: {self.reasoning_not_rendered} samples carry reasoning on their final turn "
                         "that the chat template does not render (not trained; see docs/thinking.md)")
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {n:>6} x {reason}: e.g. {self.examples[reason]}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "records": self.records, "samples": self.samples,
                "skipped": dict(self.skipped), "tokens": self.tokens, "learned_tokens": self.learned_tokens,
                "truncated": self.truncated, "full_sequence_samples": self.full_sequence_samples,
                "reasoning_not_rendered": self.reasoning_not_rendered}


# ----------------------------------------------------------------------------------------------------------
# Loading.

def iter_records(path_or_records: Any) -> Iterator[tuple[str, int, Any]]:
    """Yield (source, line_or_row, record). JSONL lines are 1-based; JSON/Parquet/datasets rows 1-based too."""
    if not isinstance(path_or_records, (str, Path)):
        for i, rec in enumerate(path_or_records, start=1):
            yield "<records>", i, rec
        return
    path = Path(path_or_records)
    src = str(path)
    if not path.exists():
        if _looks_like_hub_or_builder(src):
            yield from _iter_datasets(src)
            return
        raise ConfigError(f"dataset '{src}' does not exist. Fix: check the path (relative paths are resolved "
                          f"from the current directory)")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
        opener = _open_text(path)
        with opener as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    rec = _BadJSON(str(e))
                yield src, i, rec
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError("a .json dataset must hold a list of records (or {\"data\": [...]})", source=src,
                            fix="write a JSON array of objects, or use JSONL", reason="not_an_object")
        for i, rec in enumerate(data, start=1):
            yield src, i, rec
    elif suffix == ".parquet":
        table = pq.read_table(path)
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield src, i, _from_arrow(rec)
    else:
        yield from _iter_datasets(src)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _from_arrow(rec: dict) -> dict:
    # Parquet stores missing struct fields as None; drop those so "absent" and "null" mean the same.
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        rec["messages"] = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                           for m in msgs]
    return {k: v for k, v in rec.items() if v is not None}


def _looks_like_hub_or_builder(src: str) -> bool:
    return "/" in src and not src.startswith((".", "/"))


def _iter_datasets(src: str):
    path = Path(src)
    builders = {".csv": "csv", ".tsv": "csv", ".arrow": "arrow", ".txt": "text"}
    if path.is_file() and path.suffix.lower() in builders:
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        ds = datasets.load_dataset(builders[path.suffix.lower()], data_files=str(path), split="train", **kwargs)
    elif path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))  # a Dataset.save_to_disk directory
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    else:  # a hub id or a local dataset script/directory
        ds = datasets.load_dataset(src, split="train")
    for i, rec in enumerate(ds, start=1):
        yield src, i, _from_arrow(dict(rec))


class _BadJSON:
    def __init__(self, msg: str):
        self.msg = msg


# ----------------------------------------------------------------------------------------------------------
# Label audit.

def audit_labels(samples: list[EncodedSample], allow_full_sequence_loss: bool = False,
                 source: str = "dataset", threshold: float = 0.5) -> int:
    """Refuse datasets whose labels equal input_ids everywhere (the prompt would be trained).

    Returns the number of fully-learned samples. Raises LabelAuditError when more than `threshold` of the
    samples learn every token, unless allow_full_sequence_loss.
    """
    full = sum(1 for s in samples if s.labels and all(lab != IGNORE_INDEX for lab in s.labels))
    if samples and full / len(samples) > threshold and not allow_full_sequence_loss:
        raise LabelAuditError(
            f"{source}: {full} of {len(samples)} samples learn every token (labels == input_ids everywhere). "
            "The prompt, system text and role headers would be trained, so the model learns to copy prompts "
            "instead of answering. This usually means the data was pre-rendered into one text field or the "
            "chat template has no assistant turn. Fix: use the messages or prompt/completion form; if full-"
            "sequence loss is really intended (continued pre-training), set allow_full_sequence_loss: true")
    if full:
        log.info("%s: %d samples learn every token (allow_full_sequence_loss=%s)", source, full,
                 allow_full_sequence_loss)
    return full


# ----------------------------------------------------------------------------------------------------------
# Build.

def build_sft_dataset(path_or_records: Any, tokenizer, policy: ChatPolicy | None = None,
                      on_error: str = "raise", audit: bool = True,
                      limit: int | None = None) -> tuple[list[EncodedSample], DatasetReport]:
    """Validate + encode every record. Returns (samples, report).

    path_or_records: a path (.jsonl, .jsonl.gz, .json, .parquet, or a `datasets` name/builder when that
    package is installed) or an iterable of record dicts.
    on_error: "raise" stops at the first bad record with a DataError naming file/line/field/fix; "skip"
    counts it by reason in the report (report.summary()).
    The label audit (audit_labels) runs at the end unless audit=False.
    limit: read only the first N records (None = all).
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}. Fix: use 'raise' or 'skip'")
    policy = policy or ChatPolicy()
    source = str(path_or_records) if isinstance(path_or_records, (str, Path)) else "<records>"
    report = DatasetReport(source=source)
    samples: list[EncodedSample] = []
    for src, line, rec in itertools.islice(iter_records(path_or_records), limit):
        report.records += 1
        try:
            if isinstance(rec, _BadJSON):
                raise DataError(f"invalid JSON ({rec.msg})", source=src, line=line, reason="invalid_json",
                                fix="write one JSON object per line")
            sample = validate_record(rec, source=src, line=line, instruction_format=policy.instruction_format)
            res = encode_sample(tokenizer, sample, policy)
        except DataError as e:
            if on_error == "raise":
                raise
            report.add_skip(e)
            continue
        for e in res.skipped:  # expanded turns that had nothing left to learn
            if on_error == "raise":
                raise e
            report.add_skip(e)
        for s in res.samples:
            samples.append(s)
            report.tokens += len(s)
            report.learned_tokens += s.num_learned
            report.truncated += 1 if s.meta.get("truncated") else 0
            report.reasoning_not_rendered += 1 if s.meta.get("reasoning_not_rendered") else 0
    report.samples = len(samples)
    if report.num_skipped or report.reasoning_not_rendered:
        log.warning("%s", report.summary())
    if audit:
        report.full_sequence_samples = audit_labels(samples, policy.allow_full_sequence_loss, source)
    return samples, report
