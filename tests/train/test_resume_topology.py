"""Resuming a DeepSpeed ZeRO checkpoint on another topology (real launcher, gloo, DS_ACCELERATOR=cpu):
ZeRO-3 2 -> 1 ranks, 1 -> 2 ranks, sequence parallelism SP 2 (2 ranks) -> 1 rank, ZeRO-2 2 -> 1 ranks, and DDP
2 -> 1 ranks (no ZeRO state: only the data part applies, and (c) does not).

The first launch stops after step 3 of epoch 0 (train.max_steps=3, which saves step-3). The second launch, at the
other world size, resumes it with train.epochs=2 and finishes. Each scenario checks that
(a) the resumed launch exits 0, after one log line saying the ZeRO state was converted to the universal format;
(b) the sample ids trained on over the whole run (both launches, recorded by DISTTHINK_PROBE_SAMPLES) are every
    sample exactly once per epoch, which is what the uninterrupted run sees (its plan is computed here with the
    run's own sampler, the reference being the packing guarantee of tests/data/test_packing.py);
(c) the fp32 master weights and Adam moments right after the resume's load equal those gathered at the save
    (DISTTHINK_PROBE_OPTIMIZER), bit for bit: the conversion and re-partitioning only move float32 values.
(d) A leaky resume (DISTTHINK_FAULT_RESHARD_LEAK=per_rank_position: each rank's saved position reused in the new
    layout's plan) repeats and skips samples, and the checker of (b) reports it. A second resume of the same
    checkpoint reuses the conversion (one log line saying so, the folder untouched)."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from _train_utils import FAST, launch, summary
from safetensors.torch import load_file

from distthink.config import load_config
from distthink.engine.batching import continue_plan, load_split, make_sampler
from distthink.engine.task import make_task
from distthink.models.load import load_tokenizer

N_SAMPLES, EPOCHS = 40, 2
COMMON = FAST + ["batch.max_tokens=256", "data.max_length=256", f"data.max_train_samples={N_SAMPLES}",
                 "lora.enabled=false", "checkpoint.export=none", "checkpoint.every_steps=0", "train.lr=1e-2",
                 "train.warmup_steps=1", "distributed.deepspeed=ds_configs/zero3.json"]
CONVERTED, REUSED = "converted its DeepSpeed state once to the universal", "reusing its universal"


def _records(probe: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(probe.glob("samples-dp*.jsonl")) for line in f.read_text().splitlines()]


def sample_problems(records: list[dict], num_samples: int, epochs: int) -> list[str]:
    """What differs from "every sample exactly once per epoch" (the uninterrupted run's sample set): [] if nothing."""
    problems = []
    for epoch in range(epochs):
        seen = Counter(i for r in records if r["epoch"] == epoch for i in r["ids"])
        repeated = sorted(i for i, n in seen.items() if n > 1)
        missing = sorted(set(range(num_samples)) - set(seen))
        if repeated or missing:
            problems.append(f"epoch {epoch}: repeated {repeated}, missing {missing}")
    return problems


def _uninterrupted_sample_set(dp: int) -> Counter:
    """The ids of the uninterrupted run's epochs, planned by the run's own sampler at `dp` ranks."""
    cfg = load_config(None, [f"data.max_train_samples={N_SAMPLES}", "batch.max_tokens=256", "data.max_length=256"])
    task, tok = make_task(cfg), load_tokenizer(cfg)
    task.prepare_tokenizer(tok)
    samples = load_split(cfg, task, "train", tok)
    sampler = make_sampler(cfg, samples, world=dp, rank=0, grad_accumulation=1, shuffle=True)
    return Counter(i for e in range(EPOCHS) for b in sampler.global_plan(e) for i in b)


def _optimizer_equal(probe: Path, step: int):
    saved, loaded = (load_file(str(probe / f"{event}-step{step:08d}.safetensors")) for event in ("save", "load"))
    assert saved.keys() == loaded.keys() and len(saved) >= 3
    assert any(k.endswith("/exp_avg_sq") and float(v.abs().sum()) > 0 for k, v in saved.items())  # a trained state
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert not different, different[:5]


def _first_launch(tmp_path: Path, nproc: int, extra=()) -> Path:
    out = tmp_path / "run"
    launch([*COMMON, f"train.output_dir={out}", "train.max_steps=3", *extra], nproc=nproc,
           DISTTHINK_PROBE_SAMPLES=tmp_path / "samples", DISTTHINK_PROBE_OPTIMIZER=tmp_path / "optimizer")
    assert summary(out)["steps"] == 3 and (out / "checkpoints" / "step-00000003").is_dir()
    return out


def _resume(tmp_path: Path, out: Path, nproc: int, extra=(), probe="samples", **env):
    proc = launch([*COMMON, f"train.output_dir={out}", "train.max_steps=0", f"train.epochs={EPOCHS}", *extra],
                  nproc=nproc, DISTTHINK_PROBE_SAMPLES=tmp_path / probe,
                  DISTTHINK_PROBE_OPTIMIZER=tmp_path / "optimizer", **env)
    assert "resumed from" in proc.stderr and "(step 3)" in proc.stderr
    return proc


@pytest.mark.slow
def test_zero3_two_ranks_resume_on_one_and_a_second_resume_reuses_the_conversion(tmp_path):
    out = _first_launch(tmp_path, nproc=2)
    leaky = tmp_path / "leaky-run"
    shutil.copytree(out, leaky)
    proc = _resume(tmp_path, out, nproc=1)
    assert proc.stderr.count(CONVERTED) == 1 and REUSED not in proc.stderr, proc.stderr[-3000:]
    assert "global batch: 2 -> 1 micro-batches (packed rows of <= 256 tokens) per optimizer step" in proc.stderr
    records = _records(tmp_path / "samples")
    assert {r["dp_size"] for r in records} == {1, 2}
    assert sample_problems(records, N_SAMPLES, EPOCHS) == []
    assert Counter(i for r in records for i in r["ids"]) == _uninterrupted_sample_set(2)
    _optimizer_equal(tmp_path / "optimizer", 3)

    # A second resume of step-3 (here into another output dir) reuses the conversion.
    universal = out / "checkpoints" / "step-00000003" / "universal"
    stamp = (universal / "latest_universal").stat().st_mtime_ns
    again = launch([*COMMON, f"train.output_dir={tmp_path / 'again'}", "train.max_steps=4",
                    f"checkpoint.resume={out / 'checkpoints' / 'step-00000003'}"])
    assert again.stderr.count(REUSED) == 1 and CONVERTED not in again.stderr, again.stderr[-3000:]
    assert (universal / "latest_universal").stat().st_mtime_ns == stamp

    # Leaky: each rank's saved position reused in the new plan; the checker must see repeats/skips.
    _resume(tmp_path, leaky, nproc=1, probe="leaky-samples", DISTTHINK_FAULT_RESHARD_LEAK="per_rank_position")
    leaked = [r for r in records if r["dp_size"] == 2] + _records(tmp_path / "leaky-samples")
    assert sample_problems(leaked, N_SAMPLES, EPOCHS) != []


@pytest.mark.slow
def test_zero3_one_rank_resumes_on_two(tmp_path):
    out = _first_launch(tmp_path, nproc=1)
    proc = _resume(tmp_path, out, nproc=2)
    assert proc.stderr.count(CONVERTED) == 1, proc.stderr[-3000:]
    assert "global batch: 1 -> 2 micro-batches (packed rows of <= 256 tokens) per optimizer step" in proc.stderr
    assert sample_problems(_records(tmp_path / "samples"), N_SAMPLES, EPOCHS) == []
    _optimizer_equal(tmp_path / "optimizer", 3)


@pytest.mark.slow
def test_sequence_parallel_two_ranks_resume_on_one(tmp_path):
    # SP 2 on 2 ranks is one data-parallel rank, like 1 rank: the data plan continues unchanged, while ZeRO-3's
    # shards (over all ranks of the SP group) go from 2 to 1.
    out = _first_launch(tmp_path, nproc=2, extra=["distributed.sequence_parallel=2"])
    proc = _resume(tmp_path, out, nproc=1)
    assert proc.stderr.count(CONVERTED) == 1 and "global batch" not in proc.stderr, proc.stderr[-3000:]
    records = _records(tmp_path / "samples")
    assert {r["dp_size"] for r in records} == {1}
    assert sample_problems(records, N_SAMPLES, EPOCHS) == []
    _optimizer_equal(tmp_path / "optimizer", 3)


@pytest.mark.slow
def test_zero2_two_ranks_resume_on_one(tmp_path):
    zero2 = ["distributed.deepspeed=ds_configs/zero2.json"]
    out = _first_launch(tmp_path, nproc=2, extra=zero2)
    proc = _resume(tmp_path, out, nproc=1, extra=zero2)
    assert proc.stderr.count(CONVERTED) == 1, proc.stderr[-3000:]
    assert sample_problems(_records(tmp_path / "samples"), N_SAMPLES, EPOCHS) == []
    _optimizer_equal(tmp_path / "optimizer", 3)


@pytest.mark.slow
def test_ddp_two_ranks_resume_on_one(tmp_path):
    # Without DeepSpeed there are no shards to convert; the data plan continues at the same global sample.
    ddp = ["distributed.deepspeed=null"]
    out = _first_launch(tmp_path, nproc=2, extra=ddp)
    proc = _resume(tmp_path, out, nproc=1, extra=ddp)
    assert CONVERTED not in proc.stderr and "global batch: 2 -> 1" in proc.stderr
    assert sample_problems(_records(tmp_path / "samples"), N_SAMPLES, EPOCHS) == []


@pytest.mark.parametrize("mode", ["tokens", "samples"])
@pytest.mark.parametrize("old, new", [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 2), (3, 1)), ((4, 1), (2, 3))])
def test_continue_plan_sees_each_sample_once_per_epoch(mode, old, new):
    """The data part alone, for several (DP, GA) -> (DP, GA) and positions: the steps before the save (old layout)
    plus those after the resume (new layout) cover the epoch once; the leaky per-rank position does not."""
    lengths = [17 + (i * 37) % 90 for i in range(60)]  # 17..106 tokens
    samples = [[0] * n for n in lengths]
    cfg = load_config(None, [f"batch.mode={mode}", "batch.max_tokens=256", "data.max_length=256",
                              "batch.samples_per_micro=2"])

    def sampler(dp, ga, rank=0):
        return make_sampler(cfg, samples, world=dp, rank=rank, grad_accumulation=ga, shuffle=True)

    (dp0, ga0), (dp1, ga1) = old, new
    steps_before = len(sampler(dp0, ga0).rank_batches(0)) // ga0
    for done in range(steps_before + 1):
        before = [i for r in range(dp0) for b in sampler(dp0, ga0, r).rank_batches(0)[:done * ga0] for i in b]
        state = {"dp_size": dp0, "world_size": dp0, "grad_accumulation": ga0, "epoch": 0, "micro_index": done * ga0}
        after, leaky = [], []
        for r in range(dp1):
            resumed, start = continue_plan(cfg, samples, sampler(dp1, ga1, r), state, world=dp1, rank=r,
                                           grad_accumulation=ga1, shuffle=True)
            batches = resumed.rank_batches(0)[start:]
            assert len(batches) % ga1 == 0
            after += [i for b in batches for i in b]
            leaky += [i for b in sampler(dp1, ga1, r).rank_batches(0)[done * ga0:] for i in b]
        usable = sorted(i for b in sampler(dp0, ga0).global_plan(0) for i in b)
        seen = sorted(before + after)
        if mode == "tokens":  # every sample once, as in any uninterrupted epoch
            assert seen == list(range(len(samples))), (done, seen)
        else:  # none repeated; only the tail that cannot fill a step on the new ranks is left out
            assert len(set(seen)) == len(seen) and set(seen) <= set(usable)
            assert len(usable) - len(seen) < 2 * dp1 * ga1
        if 0 < done < steps_before and mode == "tokens":
            assert sorted(before + leaky) != list(range(len(samples))), done
