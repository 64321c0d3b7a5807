"""Reading JSONL with errors that point at the line: the one reader the commands share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from distthink.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield (1-based line number, parsed value) for each non-blank line; bad JSON names file and line."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON ({err.msg})", source=str(path), line=n,
                                fix="each line must be one JSON object", reason="invalid_json") from None
