"""Dataset mixtures (distthink/data/mixture.py, engine/batching.MixtureSampler): sources drawn in proportion to
their weights, deterministically per (seed, epoch), exactly again after a resume, with per-source counts and
losses logged."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _tolerance import run_metric_tol
from _train_utils import FAST, launch, metrics

from distthink.config import load_config
from distthink.data.mixture import MixedSplit, mixture_epoch, parse_sources
from distthink.engine import batching
from distthink.errors import ConfigError
from distthink.resources import ASSETS

TRAIN, EVAL = ASSETS / "sample_sft.jsonl", ASSETS / "sample_sft_eval.jsonl"


def test_sources_are_parsed_and_bad_ones_refused_with_a_fix():
    assert parse_sources("a.jsonl") == parse_sources(["a.jsonl"])
    got = parse_sources([{"path": "x/a.jsonl", "weight": 1}, {"path": "b.parquet", "weight": 3, "name": "bee"}])
    assert [(s.path, s.weight, s.name) for s in got] == [("x/a.jsonl", 0.25, "a"), ("b.parquet", 0.75, "bee")]
    for bad, words in (([], "empty"), ([{"path": "a", "weight": 0}], "weight"), ([{"path": "a", "weight": True}],
                       "weight"), ([{"weight": 1}], "no path"), ([{"path": "a", "wieght": 1}], "unknown"),
                       (["d1/a.jsonl", "d2/a.jsonl"], "distinct names"), ([3], "neither")):
        with pytest.raises(ConfigError, match=f"{words}.*Fix"):
            parse_sources(bad)
    with pytest.raises(ConfigError, match="weight"):  # checked at start-up, like every config key
        load_config(None, ["data.train=[{path: a.jsonl, weight: -1}]"])


def _within_3_sigma(counts, n, weights) -> bool:
    return all(abs(c - n * w) <= 3 * math.sqrt(n * w * (1 - w)) for c, w in zip(counts, weights))


def test_sources_are_drawn_in_their_proportions():
    sizes, weights = [300, 1000, 50], [0.2, 0.5, 0.3]
    draws = np.concatenate([mixture_epoch(sizes, weights, seed=7, epoch=e) for e in range(8)])
    assert len(draws) == 8 * sum(sizes) >= 10_000
    source = np.searchsorted(np.cumsum(sizes), draws, side="right")
    counts = np.bincount(source, minlength=3)
    assert _within_3_sigma(counts, len(draws), weights), counts
    # the check has teeth: drawing uniformly over all samples (the plain concatenation) is far outside it
    assert not _within_3_sigma(np.array(sizes) * 8, len(draws), weights)
    # inside a source every sample is used before any repeats (up-sampled: 50 samples drawn ~3x each per epoch)
    small = draws[source == 2] - 1300
    assert np.bincount(small, minlength=50).max() - np.bincount(small, minlength=50).min() <= 8
    # a pure function of (seed, epoch)
    assert (mixture_epoch(sizes, weights, 7, 3) == mixture_epoch(sizes, weights, 7, 3)).all()
    assert (mixture_epoch(sizes, weights, 7, 3) != mixture_epoch(sizes, weights, 7, 4)).any()
    assert (mixture_epoch(sizes, weights, 8, 3) != mixture_epoch(sizes, weights, 7, 3)).any()


class _Part(list):
    def __init__(self, lengths):
        super().__init__(range(len(lengths)))
        self.lengths = np.asarray(lengths)


@pytest.mark.parametrize("mode", ["tokens", "samples"])
def test_mixture_sampler_keeps_the_sampler_contract(mode):
    rng = np.random.default_rng(0)
    parts = [_Part(rng.integers(20, 200, 90)), _Part(rng.integers(20, 200, 400))]
    data = MixedSplit(parts, parse_sources([{"path": "a", "weight": 0.7}, {"path": "b", "weight": 0.3}]))
    cfg = load_config(None, [f"batch.mode={mode}", "batch.max_tokens=1024", "batch.samples_per_micro=3"])
    plans = [batching.make_sampler(cfg, data, world=2, rank=r, grad_accumulation=2, shuffle=True) for r in (0, 1)]
    for epoch in (0, 1):
        per_rank = [p.rank_batches(epoch) for p in plans]
        assert len(per_rank[0]) == len(per_rank[1]) and len(per_rank[0]) % 2 == 0
        used = sorted(i for batches in per_rank for b in batches for i in b)
        drawn = sorted(data.epoch_indices(cfg.train.seed, epoch).tolist())
        if mode == "tokens":
            assert used == drawn  # every drawn sample exactly once
            assert all(data.lengths[b].sum() <= 1024 for batches in per_rank for b in batches)
        else:
            assert len(used) == len(drawn) - len(drawn) % 12 and set(used) <= set(drawn)
    assert plans[0].rank_batches(1) != plans[0].rank_batches(0)


@pytest.mark.slow
def test_a_mixture_trains_logs_per_source_counts_and_resumes_exactly(tmp_path):
    common = [x for x in FAST if not x.startswith("logging.tensorboard")] + [
        f'data.train=[{{path: "{TRAIN}", weight: 0.7, name: puzzles}}, {{path: "{EVAL}", weight: 0.3}}]',
        "data.max_train_samples=40", "batch.max_tokens=512", "data.max_length=512", "train.max_steps=14",
        "train.warmup_steps=1", "checkpoint.every_steps=5", "checkpoint.export=none", "checkpoint.resume=auto",
        "lora.enabled=true", "lora.dropout=0.1"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    proc = launch(common + [f"train.output_dir={ref_dir}", "logging.tensorboard=true"])
    assert "a mixture of puzzles (40 samples, weight 0.7), sample_sft_eval (40 samples, weight 0.3)" in proc.stderr
    ref = metrics(ref_dir)
    assert {r["epoch"] for r in ref} == {0, 1}  # the run crosses an epoch: a new draw
    for r in ref:
        assert r["mix/puzzles/samples"] + r["mix/sample_sft_eval/samples"] > 0
        assert r["mix/puzzles/learned_tokens"] + r["mix/sample_sft_eval/learned_tokens"] == r["learned_tokens"]
        assert r["mix/puzzles/weight_sum"] + r["mix/sample_sft_eval/weight_sum"] == pytest.approx(r["weight_sum"])
        # the per-source losses, weighted by their sources' weight sums, add up to the step's loss (an independent
        # total: the trainer's global sum / W); both are float32 sums over the step's tokens in another order
        parts = [(r[f"mix/{k}/loss"], r[f"mix/{k}/weight_sum"]) for k in ("puzzles", "sample_sft_eval")]
        mean = sum(loss * w for loss, w in parts if w > 0) / sum(w for _, w in parts)
        assert abs(mean - r["loss"]) < run_metric_tol(r["loss"], r["learned_tokens"]), r
    # the check above can fail: the two sources' losses differ by far more than its bound (swapping them, or
    # attributing a sample to the wrong source, moves the weighted mean)
    spread = max(abs(r["mix/puzzles/loss"] - r["mix/sample_sft_eval/loss"]) for r in ref
                 if r["mix/puzzles/loss"] is not None and r["mix/sample_sft_eval/loss"] is not None)
    assert spread > 100 * run_metric_tol(ref[0]["loss"], ref[0]["learned_tokens"])
    total = {k: sum(r[f"mix/{k}/samples"] for r in ref) for k in ("puzzles", "sample_sft_eval")}
    assert total["puzzles"] > total["sample_sft_eval"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in ref_dir.rglob("events.out.tfevents.*")]
    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "mix/puzzles/samples" in tags and "mix/sample_sft_eval/learned_tokens" in tags
    assert "mix/puzzles/loss" in tags

    killed = launch(common + [f"train.output_dir={run_dir}"], check=False, DISTTHINK_FAULT_KILL_AT_STEP="9:0")
    assert killed.returncode != 0
    proc = launch(common + [f"train.output_dir={run_dir}"])
    assert "resumed from" in proc.stderr and "(step 5)" in proc.stderr
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in ref]
    for a, b in zip(ref, resumed):
        counts = (lambda r: {k: v for k, v in r.items() if (k.startswith("mix/") and not k.endswith("/loss"))
                             or k == "epoch"})
        assert counts(a) == counts(b)
        for k in ("puzzles", "sample_sft_eval"):
            if a[f"mix/{k}/loss"] is not None:
                assert abs(a[f"mix/{k}/loss"] - b[f"mix/{k}/loss"]) < 1e-6, a["step"]
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6, a["step"]
