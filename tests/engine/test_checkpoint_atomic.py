"""Atomic checkpoints: a process killed (-9) in the middle of writing a checkpoint never corrupts the
last good one. `latest` keeps pointing at the previous complete checkpoint, `distthink check` accepts
it and flags the torn one, and resume=auto continues from it (removing the stale temp directory)."""

import subprocess
import time

import pytest
from _train_utils import FAST, ROOT, command, env, launch, summary

from distthink.engine.check import check_path

pytestmark = pytest.mark.slow


def test_kill_during_save_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "atomic"
    args = FAST + [f"train.output_dir={out}", "train.max_steps=6", "checkpoint.every_steps=2",
                   "checkpoint.export=none", "checkpoint.keep_last=5"]
    # The save of step 4 sleeps after every rank wrote its state but before COMPLETE/rename/latest.
    p = subprocess.Popen(command(args), cwd=ROOT, env=env(DISTTHINK_FAULT_SAVE_SLEEP_AT="4:60"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    torn = out / "checkpoints" / ".tmp-step-00000004"
    deadline = time.time() + 120
    while time.time() < deadline and not (torn.exists() and any(torn.glob("random_states_*.pkl"))):
        time.sleep(0.1)
    assert torn.exists(), "the save of step 4 never started"
    p.kill()
    p.wait(timeout=30)
    assert p.returncode == -9

    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert (root / "step-00000002" / "COMPLETE").exists() and not (root / "step-00000004").exists()
    assert check_path(out, generate=False) == []
    problems = check_path(torn, generate=False)
    assert problems and "interrupted" in problems[0]

    proc = launch(args)
    assert "(step 2)" in proc.stderr  # resumed from the last good checkpoint
    assert summary(out)["steps"] == 6 and not torn.exists()
    assert (root / "latest").read_text().strip() == "step-00000006"
