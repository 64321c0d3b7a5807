"""What the user sees when things go wrong (issue: what a new user hit on a fresh machine), with the real
launchers: DeepSpeed in one plain process, DeepSpeed JSON batch fields checked before any model is built, the
error as the last line of an `accelerate launch` (once, not once per rank), the exit status file, and a signal
to the launcher itself treated as preemption by its orphaned ranks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _train_utils import FAST, ROOT, env, launch, metrics, summary

ACCELERATE_2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "0"]
TRAINER = ["-m", "distthink.train"]


def _accelerate(args, trainer=TRAINER, **kw):
    return subprocess.run(ACCELERATE_2 + trainer + args, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=kw.get("timeout", 300))


@pytest.mark.slow
def test_deepspeed_in_one_plain_process_runs(tmp_path):
    """`python -m distthink.train distributed.deepspeed=...` without torchrun used to die in DeepSpeed's MPI
    discovery (mpi4py): the trainer now sets up the env:// rendezvous of a one-process job itself."""
    out = tmp_path / "ds1"
    proc = launch([*FAST, f"train.output_dir={out}", "distributed.deepspeed=ds_configs/zero2.json",
                   "train.max_steps=3"])
    assert summary(out)["steps"] == 3 and summary(out)["zero_stage"] == 2
    assert "env:// rendezvous" in proc.stderr and "mpi4py" not in proc.stderr


def _ds_json(tmp_path, **fields):
    base = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    zero = fields.pop("zero_optimization", None)
    base.update(fields)
    if zero is not None:
        base["zero_optimization"] = zero
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    return path


@pytest.mark.parametrize("fields,needle", [
    ({"train_batch_size": 7}, "train_batch_size=7 does not fit this run, which needs 4"),
    ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu=2 does not fit this run, which needs 1"),
    ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps=3 does not fit this run, which needs 2"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer needs ZeRO"),
])
def test_impossible_deepspeed_json_is_refused_before_any_model_is_built(tmp_path, fields, needle):
    """micro 1 x GA 2 x world 2: each batch field of the JSON is checked against the run, and the ZeRO stage
    against the offload it asks for, at start-up: exit 2 with one line and a Fix, no model built."""
    ds = _ds_json(tmp_path, **fields)
    t0 = time.time()
    proc = _accelerate([*FAST, f"train.output_dir={tmp_path / 'o'}", f"distributed.deepspeed={ds}",
                        "batch.gradient_accumulation=2"])
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last and "Fix:" in last, proc.stderr[-3000:]
    assert "model:" not in proc.stderr  # refused before distthink.models.load logged a model
    assert proc.stderr.count(needle) == 1  # once for the launch, not once per rank
    assert time.time() - t0 < 120


@pytest.mark.slow
@pytest.mark.parametrize("trainer", [TRAINER, ["-m", "distthink", "train"]], ids=["distthink.train", "distthink_train"])
def test_a_bad_config_under_accelerate_launch_ends_with_its_one_line_error(tmp_path, trainer):
    proc = _accelerate(["--config", str(tmp_path / "missing.yaml")], trainer=trainer)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1  # the launcher's code for any failed worker (docs/training.md says so)
    assert lines[-1].startswith("error: config file") and "Fix:" in lines[-1]
    assert sum(line.startswith("error: config file") for line in lines) == 1


@pytest.mark.slow
def test_exit_status_file_records_how_the_run_ended(tmp_path):
    out = tmp_path / "done"
    launch([*FAST, f"train.output_dir={out}", "train.max_steps=2"])
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 0 and status["reason"] == "done" and status["step"] == 2


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigusr1_to_the_launcher_is_preemption_for_its_orphaned_ranks(tmp_path):
    """SIGUSR1 kills `accelerate launch` at once (its default action); the ranks, re-parented, notice the
    launcher is gone, save at the next step boundary and exit 75 instead of training on silently."""
    out = tmp_path / "orphans"
    args = [*FAST, f"train.output_dir={out}", "train.max_steps=400", "checkpoint.export=none",
            "lora.enabled=false"]
    p = subprocess.Popen(ACCELERATE_2 + TRAINER + args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and (not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3):
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGUSR1)
    p.wait(timeout=30)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "exit_status.json").exists():
        time.sleep(0.5)
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 75 and status["step"] < 400
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert int(latest.split("-")[1]) == status["step"]
    assert len(metrics(out)) == status["step"]  # the ranks stopped there, nothing ran to the end


def test_skipped_records_are_counted_in_the_run_summary(tmp_path):
    """data.on_error=skip (the default): the run summary (stdout and summary.json) gives the skipped records per
    split, by reason, with the first message of each; a clean split reports 0 skipped and no summary line."""
    rows = (ROOT / "distthink" / "assets" / "sample_sft.jsonl").read_text().splitlines()[:40]
    bad = ["{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "{also not json"]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows[:10] + bad[:1] + rows[10:20] + bad[1:] + rows[20:]) + "\n")
    out = tmp_path / "run"
    proc = launch(FAST + [f"train.output_dir={out}", f"data.train={train}", "data.eval=bundled",
                          "data.max_eval_samples=8", "train.max_steps=2", "checkpoint.export=none"])
    data = summary(out)["data"]
    assert data["train"]["records"] == 43 and data["train"]["skipped"] == 3, data
    assert sum(data["train"]["reasons"].values()) == 3 and len(data["train"]["reasons"]) == 2, data
    assert all(f"{train.name}, line" in text for text in data["train"]["examples"].values()), data
    assert data["eval"]["skipped"] == 0
    assert "skipped records    3 of 43 train records" in proc.stdout and "eval records" not in proc.stdout
