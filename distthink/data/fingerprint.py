"""Fingerprints that key the encoded-data cache (distthink/data/cache.py).

An entry is keyed by everything that changes what the encoder writes, and nothing else:

- the sources' bytes (files, or every file of a folder), hashed as a byte stream, never parsed;
- the tokenizer: vocabulary, merges, normaliser, pre/post-processors, added tokens, special tokens;
- the chat template, the encoding policy (data.policy with max_length), the task's encoding options;
- the source code of the encoding modules, so that a changed encoder never reads an entry written by the old one
  (``CACHE_FORMAT`` versions the file layout itself).

A new learning rate, output directory or world size reuses the entry.

Hashing a 5 GB corpus takes seconds, so each file's hash is remembered in ``<cache_dir>/.hashes`` under its
(path, size, mtime_ns, ctime_ns, inode, device): a restart re-hashes nothing, and any write to the file moves
its mtime and ctime and makes it hash again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from distthink.atomic import write_text_atomic
from distthink.errors import ConfigError

#: The version of the cache's file layout (distthink/data/cache.py). Bump it when the layout changes.
CACHE_FORMAT = 1

#: Modules whose source code is part of every key: the chat encoder and what it builds on.
ENCODER_MODULES = ("distthink.data.chat", "distthink.data.schema", "distthink.data.thinking",
                   "distthink.data.types", "distthink.data.dataset", "distthink.data.cache",
                   "distthink.data.parallel_encode")

_BLOCK = 8 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_digest(path: str | Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered in `memo_dir` under the file's stat stamp (see module docstring)."""
    path = Path(path)
    before = _stamp(path)
    memo = None
    if memo_dir is not None:
        memo = memo_dir / (hashlib.sha256(before[0].encode()).hexdigest()[:32] + ".json")
        try:
            rec = json.loads(memo.read_text())
            if rec.get("stamp") == before:
                return rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = _sha256_file(path)
    if memo is not None and _stamp(path) == before:  # the file did not change while it was read
        memo_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps({"stamp": before, "sha256": digest}))
    return digest


def source_digest(spec: str | Path, memo_dir: Path | None = None) -> dict:
    """What keys one source: the bytes of a file, of every file under a folder, or the name of a dataset that
    `datasets` resolves itself (hub id or builder) together with that dataset's own fingerprint. The path as
    given is part of it: encoders record it in each sample's meta (`source`)."""
    path = Path(spec)
    if path.is_file():
        return {"file": str(spec), "sha256": file_digest(path, memo_dir)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(path).as_posix()}\0{file_digest(p, memo_dir)}\0".encode())
        return {"folder": str(spec), "files": len(files), "sha256": h.hexdigest()}
    return {"dataset": str(spec), "datasets_fingerprint": _datasets_fingerprint(str(spec))}


def _datasets_fingerprint(name: str) -> str:
    import datasets  # heavy; only for sources that are hub ids or builder names

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - any failure to resolve the name is the user's to fix
        raise ConfigError(f"data source '{name}' is neither a file, a folder nor a loadable dataset ({err}). "
                          "Fix: give a JSONL/Parquet file, a `save_to_disk` folder or a hub dataset id") from None
    return ds._fingerprint


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what the tokenizer does to text: its full serialised pipeline (fast tokenizers) or vocabulary,
    its added tokens and special tokens, and the switches that add bos/eos. The chat template is separate."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = sorted((int(i), str(getattr(t, "content", t)), bool(getattr(t, "special", False)))
                   for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    special = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    switches = {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")}
    h.update(json.dumps([added, special, switches], default=str).encode())
    return h.hexdigest()


def chat_template_digest(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_digest(modules: tuple[str, ...] | list[str]) -> str:
    """sha256 of the source files of `modules` (importable names), in the given order."""
    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            raise ConfigError(f"encoder module '{name}' has no source file to fingerprint. Fix: list importable "
                              "modules in SplitEncoding.code")
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return h.hexdigest()


def canonical(value: Any) -> Any:
    """A JSON-able, order-stable form of options (dataclasses, tuples, paths)."""
    if is_dataclass(value) and not isinstance(value, type):
        return canonical(asdict(value))
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def fingerprint(inputs: dict) -> str:
    """The cache key of a split: sha256 of the canonical JSON of its encoding inputs."""
    text = json.dumps(canonical(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
