"""Architecture configs (config.json numbers, no weights) of the models the shipped configs name, so that
`distthink plan` works offline. Provenance: README.md in this folder."""

from __future__ import annotations

import json

from distthink.resources import MODEL_CONFIGS


def names() -> list[str]:
    """The shipped configs, by repository name without its owner (Qwen3-8B, Llama-3.1-8B-Instruct, ...)."""
    return sorted(f.stem for f in MODEL_CONFIGS.glob("*.json"))


def load(name: str) -> dict | None:
    """The shipped config.json of `name` (a hub id such as Qwen/Qwen3-8B, or the bare repository name), else
    None. Names compare without case; Meta's older repository names (Meta-Llama-3.1-8B) find the same file."""
    stem = str(name).rstrip("/").rsplit("/", 1)[-1].lower()
    if stem.startswith("meta-llama-"):
        stem = stem[len("meta-"):]
    for known in names():
        if known.lower() == stem:
            return json.loads((MODEL_CONFIGS / f"{known}.json").read_text())
    return None
