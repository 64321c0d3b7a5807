"""Dataset mixtures: `data.train` as weighted sources, drawn in those proportions.

    data:
      train:
        - {path: reasoning.jsonl, weight: 0.2}
        - {path: chat.jsonl, weight: 0.8, name: chat}

A source may carry `options`: encoding options of that source that its task declares (`Task.source_options`;
ThinkRec: `reason_ratio`, see docs/thinkrec.md), e.g. the same file once as reasoning samples and once label-only.

Each source is encoded into its own cache entry (distthink/data/cache.py); `MixedSplit` puts them end to end
(global index = source offset + index in the source). One epoch of a mixture is as many samples as all sources
hold together; each of them is drawn from source k with probability weight_k (the weights are normalised), and
inside a source the samples come from a fresh permutation of it (repeated when the source is drawn more often
than it has samples: small sources are up-sampled, large ones sub-sampled). `mixture_epoch` is a pure function
of (sizes, weights, seed, epoch), so the plan built on it is too and a resumed run draws exactly what an
uninterrupted one draws.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distthink.errors import ConfigError

#: Random stream of the source draw, apart from the planner's own stream of the same (seed, epoch).
MIXTURE_STREAM = 0x6D6978


@dataclass(frozen=True)
class MixtureSource:
    path: str
    weight: float
    name: str
    options: dict = field(default_factory=dict)  # the task's per-source encoding options (Task.source_options)


def parse_sources(spec: Any, key: str = "data.train") -> list[MixtureSource]:
    """`data.train` as a list of sources: a string is one source of weight 1; a list holds strings or mappings
    {path, weight (> 0, default 1), name (default: the file's stem), options (a mapping, default none)}.
    Weights are normalised to sum 1."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ConfigError(f"{key} is an empty list. Fix: give a path, or a list of {{path, weight}}")
    raw = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(spec, list) else key
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where} = {item!r} is neither a path nor a mapping. Fix: write a path, or "
                              "{path: file.jsonl, weight: 0.5}")
        unknown = sorted(set(item) - {"path", "weight", "name", "options"})
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {unknown}. Fix: use path, weight, name and options")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options = {options!r} is not a mapping. Fix: e.g. "
                              "options: {reason_ratio: 1.0}")
        path, weight = item.get("path"), item.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where} has no path. Fix: {{path: file.jsonl, weight: 0.5}}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"{where}.weight = {weight!r} must be a number > 0. Fix: e.g. weight: 0.2")
        name = item.get("name") or Path(path).name.split(".")[0] or f"source{i}"
        raw.append((path, float(weight), str(name), dict(options)))
    names = [n for _, _, n, _ in raw]
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: sources need distinct names for their metrics, got {names}. Fix: set `name` on "
                          "the sources that share a file stem")
    total = sum(w for _, w, _, _ in raw)
    return [MixtureSource(p, w / total, n, o) for p, w, n, o in raw]


def is_mixture(spec: Any) -> bool:
    return isinstance(spec, list)


def mixture_epoch(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """Global sample indices of one epoch of the mixture (see the module docstring), in draw order.

    sizes: samples per source; weights: normalised source weights. Length: sum(sizes)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = int(sizes.sum())
    rng = np.random.default_rng([seed, epoch, MIXTURE_STREAM])
    source = rng.choice(len(sizes), size=n, p=np.asarray(weights, dtype=np.float64))
    out = np.empty(n, dtype=np.int64)
    for k, size in enumerate(sizes.tolist()):
        slots = np.flatnonzero(source == k)
        if not slots.size:
            continue
        if size == 0:
            raise ConfigError(f"mixture source {k} has no sample but weight {weights[k]:.3g}. Fix: remove it")
        rounds = -(-slots.size // size)
        perm = np.concatenate([rng.permutation(size) for _ in range(rounds)])[:slots.size]
        out[slots] = offsets[k] + perm
    return out


class MixedSplit(Sequence):
    """Several cached splits end to end, with the source of every sample (`source_ids`) and their `lengths`.

    Indexing, `lengths` and item assignment (on-policy tasks) behave like one split; `sources` holds the
    MixtureSource of each part."""

    def __init__(self, parts: Sequence, sources: Sequence[MixtureSource]):
        if len(parts) != len(sources):
            raise ValueError("one part per source")
        self.parts, self.sources = list(parts), list(sources)
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.lengths = np.concatenate([np.asarray(p.lengths, dtype=np.int64) for p in self.parts])
        self.source_ids = np.repeat(np.arange(len(self.parts), dtype=np.int64), self.sizes)
        self.weights = [s.weight for s in self.sources]
        self.names = [s.name for s in self.sources]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a mixture of {len(self)}")
        k = int(self.source_ids[i])
        return k, i - int(self.offsets[k])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k, j = self._locate(i)
        return self.parts[k][j]

    def __setitem__(self, i, sample) -> None:
        k, j = self._locate(i)
        self.parts[k][j] = sample

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        return mixture_epoch(self.sizes, self.weights, seed, epoch)
