"""Load SFT records (JSONL / JSON / Parquet / anything `datasets` loads), validate, encode, audit.

    samples, report = build_sft_dataset("data.jsonl", tokenizer, ChatPolicy(), on_error="skip")
    print(report.summary())

`build_sft_dataset` holds the split in memory (inspection, small data, tests). Training encodes through the
encoded-data cache instead (distthink/data/parallel_encode.py), with the same per-record encoder
(`ChatRecordEncoder`) and the same report. Records are read streaming (`iter_records`): JSONL line by line,
Parquet batch by batch, `datasets` folders row by row; only a `.json` array is read whole.

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

PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: a Parquet source is never read whole


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

    def add_sample(self, s: EncodedSample) -> None:
        """Count one encoded sample (tokens, learned tokens, truncation, the label audit's full-sequence count)."""
        learned = s.num_learned
        self.samples += 1
        self.tokens += len(s)
        self.learned_tokens += learned
        self.truncated += 1 if s.meta.get("truncated") else 0
        self.reasoning_not_rendered += 1 if s.meta.get("reasoning_not_rendered") else 0
        self.full_sequence_samples += 1 if len(s) and learned == len(s) else 0

    def merge(self, other: "DatasetReport") -> None:
        """Add the counts of a later part of the same split (an encoding worker's chunk)."""
        for name in ("records", "samples", "tokens", "learned_tokens", "truncated", "full_sequence_samples",
                     "reasoning_not_rendered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        for reason, text in other.examples.items():
            self.examples.setdefault(reason, text)

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

    def to_dict(self, with_examples: bool = False) -> dict[str, Any]:
        out = {"source": self.source, "records": self.records, "samples": self.samples,
               "skipped": dict(self.skipped), "tokens": self.tokens, "learned_tokens": self.learned_tokens,
               "truncated": self.truncated, "full_sequence_samples": self.full_sequence_samples,
               "reasoning_not_rendered": self.reasoning_not_rendered}
        if with_examples:
            out["examples"] = dict(self.examples)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetReport":
        """The report stored with a cache entry (to_dict(with_examples=True))."""
        rep = cls(source=d["source"])
        for name in ("records", "samples", "tokens", "learned_tokens", "truncated", "full_sequence_samples",
                     "reasoning_not_rendered"):
            setattr(rep, name, int(d.get(name, 0)))
        rep.skipped = Counter(d.get("skipped", {}))
        rep.examples = dict(d.get("examples", {}))
        return rep


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
                    rec = BadJSON(str(e))
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
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for rec in batch.to_pylist():
                row += 1
                yield src, row, _from_arrow(rec)
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


class BadJSON:
    """A JSONL line that is not JSON: yielded in place of the record, so the encoding loop can skip and count it
    (or raise) like any other bad record."""

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
    full = sum(1 for s in samples if len(s.labels) and all(lab != IGNORE_INDEX for lab in s.labels))
    return check_label_audit(full, len(samples), allow_full_sequence_loss, source, threshold)


def check_label_audit(full: int, samples: int, allow_full_sequence_loss: bool = False, source: str = "dataset",
                      threshold: float = 0.5) -> int:
    """The audit's decision from its counts (`full` of `samples` learn every token); see audit_labels. A cached
    split stores the counts, so a cached start decides again with the run's allow_full_sequence_loss."""
    if samples and full / samples > threshold and not allow_full_sequence_loss:
        raise LabelAuditError(
            f"{source}: {full} of {samples} samples learn every token (labels == input_ids everywhere). "
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

class ChatRecordEncoder:
    """One SFT record -> (encoded samples, skipped turns): validate_record + encode_sample under `policy`.

    The per-record step of both build_sft_dataset and the cache (picklable: it runs in encoding workers). Raises
    DataError for a record that cannot be used."""

    def __init__(self, policy: ChatPolicy):
        self.policy = policy

    def __call__(self, tokenizer, source: str, line: int, record: Any) -> tuple[list[EncodedSample], list[DataError]]:
        sample = validate_record(record, source=source, line=line,
                                 instruction_format=self.policy.instruction_format)
        res = encode_sample(tokenizer, sample, self.policy)
        return res.samples, res.skipped


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
    encoder = ChatRecordEncoder(policy)
    for src, line, rec in itertools.islice(iter_records(path_or_records), limit):
        report.records += 1
        try:
            if isinstance(rec, BadJSON):
                raise DataError(f"invalid JSON ({rec.msg})", source=src, line=line, reason="invalid_json",
                                fix="write one JSON object per line")
            got, turn_skips = encoder(tokenizer, src, line, rec)
        except DataError as e:
            if on_error == "raise":
                raise
            report.add_skip(e)
            continue
        for e in turn_skips:  # expanded turns that had nothing left to learn
            if on_error == "raise":
                raise e
            report.add_skip(e)
        for s in got:
            samples.append(s)
            report.add_sample(s)
    if report.num_skipped or report.reasoning_not_rendered:
        log.warning("%s", report.summary())
    if audit:
        check_label_audit(report.full_sequence_samples, report.samples, policy.allow_full_sequence_loss, source)
    return samples, report
