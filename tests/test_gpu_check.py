"""scripts/gpu_check.sh: the dry run on CPU (every step starts: imports, configs, command lines), and the runner's
promises with real subprocesses: a failing step does not stop the others, a step over its time limit is killed
(with its children), steps past the total budget are recorded as skipped, the JSON summary holds every step."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses resolve their module by name
_spec.loader.exec_module(gpu_check)


def test_dry_run_every_step_starts(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS] and summary["dry_run"] and summary["failed"] == 0
    for name, s in steps.items():
        assert s["status"] in ("pass", "skip"), s
        if s["status"] == "skip":  # only for a reason the summary states
            assert s["reason"], s
        else:
            assert s["figures"]["checked"], s
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash-attn is not installed" in steps["flash_varlen_packed"]["reason"]
    if not (ROOT / "benchmarks" / "long_context.py").exists():
        assert steps["long_context"]["reason"].endswith("not built yet (issue #17)")
    # the GPU-only paths of issue #19 are all there
    for name in ("thinkrec_ids_zero3", "thinkrec_ids_zero2", "thinkrec_stage3_soft", "molecule_free", "generate_cuda",
                 "rec_eval_cuda", "train_cf_sasrec_cuda", "train_fp16", "train_bf16_autocast", "pytest_gpu", "mfu"):
        assert steps[name]["status"] == "pass", steps[name]


def test_dry_run_catches_a_bad_override(tmp_path):
    step = gpu_check.Step("bad", "a typo in an override", 1, 10,
                          lambda ctx: [gpu_check._train(ctx, None, ctx.w("x"), "train.max_stepz=2")])
    ctx = gpu_check.Ctx(work=tmp_path, logs=tmp_path, dry_run=True)
    rec = gpu_check.run_step(step, ctx, 10)
    assert rec["status"] == "fail" and "max_stepz" in rec["reason"], rec


def _script(code: str) -> gpu_check.Cmd:
    return gpu_check.Cmd("script", ["-c", code])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_runner_isolates_failures_and_kills_a_step_with_its_children_at_the_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    # a command that starts a child which would outlive it: the whole process group must go at the limit
    hang = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    steps = [
        gpu_check.Step("fails", "exit 3", 1, 60, lambda ctx: [_script("import sys; print('boom'); sys.exit(3)")]),
        gpu_check.Step("hangs", "over its limit", 1, 5, lambda ctx: [_script(hang)]),
        gpu_check.Step("passes", "prints JSON", 1, 60,
                       lambda ctx: [_script("import json; print(json.dumps({'x': 1}))")],
                       lambda ctx, outs: gpu_check.last_json(outs[0])),
        gpu_check.Step("needs_failed", "depends on `fails`", 1, 60, lambda ctx: [_script("pass")], needs=("fails",)),
    ]
    out = tmp_path / "summary.json"
    summary = gpu_check.run_steps(steps, gpu_check.Ctx(work=tmp_path, logs=tmp_path), out, budget_s=600)
    by = {s["name"]: s for s in json.loads(out.read_text())["steps"]}
    assert by["fails"]["status"] == "fail" and "exit 3" in by["fails"]["reason"] and "boom" in by["fails"]["log_tail"]
    assert by["hangs"]["status"] == "fail" and by["hangs"]["reason"].startswith("time limit: killed after 5 s")
    child = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL is asynchronous: give the kernel a moment
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)
    assert by["passes"]["status"] == "pass" and by["passes"]["figures"] == {"x": 1}
    assert by["needs_failed"]["status"] == "skip" and "needs fails" in by["needs_failed"]["reason"]
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 2, 1)


def test_steps_past_the_budget_are_skipped_and_a_running_one_is_cut_to_it(tmp_path):
    sleep = _script("import time; time.sleep(60)")
    steps = [gpu_check.Step("slow", "sleeps past the budget", 1, 60, lambda ctx: [sleep]),
             gpu_check.Step("late", "after the budget", 1, 60, lambda ctx: [_script("pass")])]
    ctx = gpu_check.Ctx(work=tmp_path, logs=tmp_path)
    summary = gpu_check.run_steps(steps, ctx, tmp_path / "s.json", budget_s=2)
    slow, late = summary["steps"]
    assert slow["status"] == "fail" and "budget-s left less than the step's limit" in slow["reason"]
    assert late["status"] == "skip" and late["reason"] == "skipped: budget"


def test_script_passes_shellcheck():
    import shutil

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    assert subprocess.run(["shellcheck", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
