"""Integration tests on a real local SLURM cluster (tests/slurm_cluster.py): munged, slurmctld and two
slurmd, each in its own network namespace (own eth0 address and hostname) where the machine allows it,
else both on loopback. The multi-node path (one srun task per node, SLURM_NODEID 0 and 1, c10d
rendezvous) runs for real, with the real templates, launcher and trainer on CPU (gloo).

The jobs share one tiny smoke config (a Qwen3 built from config, bundled data, no eval, no export), except
the ThinkRec stage-3 job, which runs configs/thinkrec/stage3_smoke.yaml on synthetic inputs built in the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import TERMINAL_STATES, slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 40
FAILED_STATES = TERMINAL_STATES - {"COMPLETED"}

SMOKE_CONFIG = f"""\
# CPU smoke run for the SLURM tests: tiny Qwen3 from config, bundled data, a few seconds of steps.
model:
  from_config: tiny-qwen3
  tokenizer: tiny
data:
  train: bundled
  eval: null
  max_length: 512
batch:
  max_tokens: 512
  gradient_accumulation: 2
train:
  max_steps: {MAX_STEPS}
  lr: 3.0e-3
  warmup_steps: 2
checkpoint:
  every_steps: 0
  resume: auto
  export: none
logging:
  progress: false
  tensorboard: false
  plot: false
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-jobs")
    (d / "smoke.yaml").write_text(SMOKE_CONFIG)
    return d


def job_env(workdir: Path, output_dir: Path, **extra: str) -> dict[str, str]:
    # The job inherits this environment (sbatch --export=ALL): the venv's bin must be on PATH even when
    # pytest was started as /path/to/venv/bin/python without activating it.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DISTTHINK_ROOT": str(REPO), "DISTTHINK_CONFIG": str(workdir / "smoke.yaml"),
           "DISTTHINK_OUTPUT_DIR": str(output_dir), "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def job_log(workdir: Path, job: int, name: str = "distthink-sft") -> str:
    return (workdir / f"{name}-{job}.out").read_text()


def node_logs(output_dir: Path, job: int) -> dict[int, str]:
    return {int(re.search(r"node(\d+)", p.name).group(1)): p.read_text()
            for p in sorted((output_dir / "logs").glob(f"job{job}-node*.log"))}


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def describe(cluster, workdir, job, output_dir) -> str:
    """Everything useful when a job assertion fails."""
    parts = [f"job {job}: {cluster.job(job)}"]
    for log in sorted(workdir.glob(f"*-{job}.out")):
        parts.append(f"--- job log {log.name}\n" + log.read_text())
    for n, text in node_logs(output_dir, job).items():
        parts.append(f"--- node {n}\n{text[-3000:]}")
    return "\n".join(parts)


def finished(cluster, workdir, job, output_dir, timeout: float):
    """The job's final info; a job that has not ended by `timeout` is cancelled and the test fails with its logs."""
    try:
        return cluster.wait_job(job, timeout=timeout)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{describe(cluster, workdir, job, output_dir)}")


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(slurm_cluster):  # noqa: F811
    yield
    slurm_cluster.cancel_all()


def sbatch_template(cluster, workdir, output_dir, *sbatch_args, template="sft", **env) -> int:
    return cluster.sbatch(*sbatch_args, str(REPO / "slurm" / f"{template}.sbatch"),
                          env=job_env(workdir, output_dir, **env), cwd=str(workdir))


@pytest.fixture(scope="module")
def baseline(slurm_cluster, workdir):  # noqa: F811
    """`sbatch -N 2 --gpus-per-node=0 slurm/sft.sbatch`: 2 nodes x 1 process, uninterrupted."""
    out = workdir / "baseline"
    t0 = time.monotonic()
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0")
    info = finished(slurm_cluster, workdir, job, out, 300)
    return job, info, out, time.monotonic() - t0


def test_cluster_runs_one_task_per_node(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        "-N", "2", "-o", str(out),
        "--wrap", "srun --ntasks-per-node=1 bash -c 'echo node=$SLURM_NODEID name=$SLURMD_NODENAME'")
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info.state == "COMPLETED" and info.rc == 0, info
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("node="))
    assert lines == [f"node={i} name={n}" for i, n in enumerate(slurm_cluster.nodes)]
    mode = "network namespaces" if slurm_cluster.netns else f"loopback ({slurm_cluster.netns_unavailable})"
    print(f"cluster timings: {slurm_cluster.timings}; nodes: {mode}")


def test_sft_template_two_nodes_completes(slurm_cluster, workdir, baseline):  # noqa: F811
    job, info, out, wall = baseline
    assert info.state == "COMPLETED" and info.rc == 0, describe(slurm_cluster, workdir, job, out)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS:08d}"
    assert (out / "checkpoints" / f"step-{MAX_STEPS:08d}" / "COMPLETE").exists()
    s = summary(out)
    assert s["steps"] == MAX_STEPS and s["world_size"] == 2
    log = job_log(workdir, job)
    assert "restart 0 on 2 node(s)" in log and "training finished (exit code 0)" in log
    nodes = node_logs(out, job)
    assert sorted(nodes) == [0, 1]
    for n, text in nodes.items():
        # machine_rank expanded inside each node's task, not once in the batch shell
        assert f"(slurm node {slurm_cluster.nodes[n]}) restart 0 machine_rank={n}" in text
        assert f"--num_machines 2 --machine_rank {n} --num_processes 2" in text
        assert "training processes ended with exit code 0" in text
    print(f"2-node sft job: {wall:.1f}s wall, final loss {s['final_loss']:.6f}")


def test_preemption_saves_requeues_and_resumes_to_the_same_loss(slurm_cluster, workdir, baseline):  # noqa: F811
    base_job, base_info, base_out, _ = baseline
    assert base_info.state == "COMPLETED", describe(slurm_cluster, workdir, base_job, base_out)
    out = workdir / "preempted"
    t0 = time.monotonic()
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, describe(slurm_cluster, workdir, job, out)
        assert slurm_cluster.job(job).state in ("PENDING", "RUNNING"), describe(slurm_cluster, workdir, job, out)
        time.sleep(0.2)
    # What `--signal=B:USR1@<grace>` does before the time limit: USR1 to the batch shell only.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = finished(slurm_cluster, workdir, job, out, 300)
    wall = time.monotonic() - t0
    detail = describe(slurm_cluster, workdir, job, out)
    assert info.state == "COMPLETED" and info.rc == 0 and info.restarts == 1, detail

    log = job_log(workdir, job)
    # srun reports the first failing task's code: 75 from a node that saved on USR1 (or 143 when srun
    # had already TERMed a slower node); each node log says what its training processes did.
    m = re.search(r"preempted: training saved step-(\d+) and stopped \(exit code \d+\); requeueing job", log)
    assert m, detail
    saved = int(m.group(1))
    assert 0 < saved < MAX_STEPS, detail  # stopped mid-run, at a step boundary
    assert "received SIGUSR1" in log and "restart 1 on 2 node(s)" in log, detail
    assert f"resuming from: step-{saved:08d}" in log, detail
    nodes = "\n".join(node_logs(out, job).values())
    assert nodes.count("SIGUSR1: asking the training processes to save") == 2, detail
    assert nodes.count("training processes ended with exit code 75") >= 1, detail
    assert "restart 1 machine_rank=0" in nodes and "restart 1 machine_rank=1" in nodes, detail
    assert re.search(rf"resumed from \S+step-{saved:08d} \(step {saved}\)", nodes), detail
    # every step exactly once across the two runs, and the result of an uninterrupted run
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1)), detail
    final, reference = summary(out)["final_loss"], summary(base_out)["final_loss"]
    # bit-identical by construction (same layout, data order, RNG, OMP_NUM_THREADS=1; measured equal): a tolerance
    # would hide a lossy round trip of the checkpoint
    assert final == reference, (final, reference)
    print(f"preempted at step {saved}, requeued, resumed; {wall:.1f}s wall; final loss {final:.8f} "
          f"vs uninterrupted {reference:.8f} (diff {abs(final - reference):.2e})")


def test_a_bad_config_fails_before_anything_starts(slurm_cluster, workdir):  # noqa: F811
    bad = workdir / "bad.yaml"
    bad.write_text(SMOKE_CONFIG.replace("max_tokens: 512", "max_tokens: 100"))  # < data.max_length
    out = workdir / "bad"
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0",
                          DISTTHINK_CONFIG=str(bad))
    info = finished(slurm_cluster, workdir, job, out, 60)
    detail = describe(slurm_cluster, workdir, job, out)
    assert info.state == "FAILED" and info.rc == 2, detail
    log = job_log(workdir, job)
    assert "config error: batch.max_tokens" in log and "Nothing was started" in log, detail
    assert not node_logs(out, job), detail


def test_a_dying_rank_fails_the_job_fast(slurm_cluster, workdir):  # noqa: F811
    """Rank 1 SIGKILLs itself before step 3 (trainer's fault hook): the other node must not hang in
    its collective until the gloo timeout; srun --kill-on-bad-exit ends the job, with a clear log."""
    out = workdir / "faulty"
    t0 = time.monotonic()
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0", template="stage1",
                          DISTTHINK_FAULT_KILL_AT_STEP="3:1")
    info = finished(slurm_cluster, workdir, job, out, 240)
    wall = time.monotonic() - t0
    detail = describe(slurm_cluster, workdir, job, out)
    assert info.state == "FAILED" and info.rc != 0 and info.restarts == 0, detail
    log = job_log(workdir, job, name="distthink-stage1")
    assert "error: training failed (srun exit code" in log, detail
    assert "Last lines of each node log" in log, detail
    print(f"failing job ended in {wall:.1f}s: {info}")


def test_rendered_stage3_script_runs_one_node_two_processes(slurm_cluster, workdir, baseline):  # noqa: F811
    """`distthink slurm render` output is what runs: sbatch it as is (stage3 template with the smoke
    config, 1 node x 2 CPU processes)."""
    base_job, base_info, base_out, _ = baseline
    out = workdir / "rendered"
    script = workdir / "rendered.sbatch"
    cmd = [sys.executable, "-m", "distthink", "slurm", "render", "--template", "stage3", "--nodes", "1",
           "--gpus-per-node", "0", "--cpu-procs-per-node", "2", "--config", str(workdir / "smoke.yaml"),
           "--output-dir", str(out), "--job-name", "rendered", "-o", str(script)]
    subprocess.run(cmd, check=True, cwd=str(workdir))
    env = job_env(workdir, out)
    for key in ("DISTTHINK_CONFIG", "DISTTHINK_OUTPUT_DIR", "DISTTHINK_ROOT"):  # the script carries them
        env.pop(key)
    job = slurm_cluster.sbatch(str(script), env=env, cwd=str(workdir))
    info = finished(slurm_cluster, workdir, job, out, 300)
    assert info.state == "COMPLETED" and info.rc == 0, describe(slurm_cluster, workdir, job, out)
    log = job_log(workdir, job, name="rendered")
    assert "1 node(s) x 2 process(es) = 2; CPU, gloo" in log
    s = summary(out)
    assert s["world_size"] == 2 and s["steps"] == MAX_STEPS
    if base_info.state == "COMPLETED":  # same world size, data order and OMP_NUM_THREADS=1: the same run, exactly
        assert s["final_loss"] == summary(base_out)["final_loss"]


def test_thinkrec_stage3_template_one_node_two_processes(slurm_cluster, workdir):  # noqa: F811
    """`sbatch slurm/stage3.sbatch` with the real ThinkRec stage-3 smoke config (MoLoRA experts from a stage-1
    adapter, hard gates from a `rec group` table), 1 node x 2 CPU processes: completes with exit code 0, writes
    the checkpoint, the per-job and per-node logs, and the MoLoRA export (molora.json + one PEFT folder each)."""
    import pandas as pd
    from _thinkrec_inputs import write_adapter, write_groups  # the stage-3 tests' input builders

    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    inputs = workdir / "stage3-inputs"
    prep = inputs / "prep"
    prepare_synthetic(prep, reasons="template", n_users=20, n_items=40, min_per_user=10, max_per_user=20)
    users = pd.read_parquet(prep / "train.parquet")["user_id"].tolist()
    write_groups(inputs / "groups", users)
    write_adapter(inputs / "stage1")
    out = workdir / "stage3"
    steps = 4
    overrides = (f"data.train={prep / 'train.parquet'} data.eval=null "
                 f"task.options.molora.groups_dir={inputs / 'groups'} "
                 f"task.options.molora.init_adapter={inputs / 'stage1'} "
                 f"task.options.max_train_samples=16 train.max_steps={steps}")
    t0 = time.monotonic()
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=1", "--gpus-per-node=0", template="stage3",
                          DISTTHINK_CONFIG=str(REPO / "configs" / "thinkrec" / "stage3_smoke.yaml"),
                          DISTTHINK_CPU_PROCS_PER_NODE="2", DISTTHINK_OVERRIDES=overrides)
    info = finished(slurm_cluster, workdir, job, out, 240)
    wall = time.monotonic() - t0
    detail = describe(slurm_cluster, workdir, job, out)
    assert info.state == "COMPLETED" and info.rc == 0, detail
    log = job_log(workdir, job, name="distthink-stage3")
    assert "restart 0 on 1 node(s)" in log and "1 node(s) x 2 process(es) = 2; CPU, gloo" in log, detail
    assert "stage3_smoke.yaml" in log and "training finished (exit code 0)" in log, detail
    nodes = node_logs(out, job)
    assert sorted(nodes) == [0], detail
    assert "--num_machines 1 --machine_rank 0 --num_processes 2" in nodes[0], detail
    assert "training processes ended with exit code 0" in nodes[0], detail
    ckpt = f"step-{steps:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt, detail
    assert (out / "checkpoints" / ckpt / "COMPLETE").exists(), detail
    s = summary(out)
    assert s["steps"] == steps and s["world_size"] == 2, s
    meta = json.loads((out / "export" / "molora" / "molora.json").read_text())
    assert meta["adapters"] == ["expert_0", "expert_1", "expert_2", "global"], meta
    for name in meta["adapters"]:
        assert (out / "export" / "molora" / name / "adapter_model.safetensors").exists(), name
    print(f"stage3 (ThinkRec MoLoRA) 1x2 job: {wall:.1f}s wall, final loss {s['final_loss']:.6f}")


def test_zero3_across_two_namespace_hosts(slurm_cluster, workdir):  # noqa: F811
    """The stretch goal: `sbatch -N 2 slurm/sft.sbatch`, 2 nodes x 1 process, DeepSpeed ZeRO-3, with
    each node a separate network namespace (own address, hostname, eth0)."""
    if not slurm_cluster.netns:
        pytest.skip(f"network namespaces unavailable: {slurm_cluster.netns_unavailable}")
    out = workdir / "zero3"
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0", DISTTHINK_NCCL_IFNAME="eth0",
                          DISTTHINK_OVERRIDES=f"distributed.deepspeed={REPO / 'ds_configs' / 'zero3.json'} "
                                              "train.max_steps=6")
    info = finished(slurm_cluster, workdir, job, out, 300)
    detail = describe(slurm_cluster, workdir, job, out)
    assert info.state == "COMPLETED" and info.rc == 0, detail
    log = job_log(workdir, job)
    head_addr = slurm_cluster.netns.addr[slurm_cluster.nodes[0]]
    assert f"rendezvous {head_addr}:" in log, detail  # the head node's own address, not loopback
    nodes = node_logs(out, job)
    for n, text in nodes.items():
        name = slurm_cluster.nodes[n]
        assert f"host {name} (slurm node {name})" in text, detail  # its own hostname
    assert "DeepSpeed ZeRO-3" in "\n".join(nodes.values()), detail
    assert (out / "checkpoints" / "step-00000006" / "COMPLETE").exists(), detail
    assert summary(out)["world_size"] == 2


@pytest.mark.skipif(os.environ.get("DISTTHINK_SLURM_TIMELIMIT_TEST") != "1",
                    reason="opt-in (~90 s): set DISTTHINK_SLURM_TIMELIMIT_TEST=1")
def test_time_limit_signal_saves_and_requeues(slurm_cluster, workdir):  # noqa: F811
    """The production trigger: `--time=1 --signal=B:USR1@45` makes SLURM itself send USR1 to the batch
    shell ~45 s before the limit; the job saves, requeues and resumes. SLURM checks the limits only every
    ~30 s, so on a slow start the signal can come before training does: that launch requeues at once
    (test_a_signal_before_training_starts_requeues_at_once) and a later one saves."""
    out = workdir / "timelimit"
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0", "--time=1",
                          "--signal=B:USR1@45", DISTTHINK_OVERRIDES="train.max_steps=100000")
    deadline = time.monotonic() + 300

    def saved_then_resumed() -> re.Match | None:
        # The batch script logs "restart N" first and its resume point a few seconds later (after the
        # rendezvous set-up): cancelling in between would cut the line this test checks.
        text = "".join(p.read_text() for p in workdir.glob(f"*-{job}.out"))
        m = re.search(r"preempted: training saved (step-\d+)", text)
        return m if m and f"resuming from: {m.group(1)}" in text[m.end():] else None

    while not saved_then_resumed():
        assert time.monotonic() < deadline, describe(slurm_cluster, workdir, job, out)
        assert slurm_cluster.job(job).state not in FAILED_STATES, describe(slurm_cluster, workdir, job, out)
        time.sleep(1)
    slurm_cluster.cancel(job)
    assert "received SIGUSR1" in job_log(workdir, job), describe(slurm_cluster, workdir, job, out)


def test_a_signal_before_training_starts_requeues_at_once(slurm_cluster, workdir):  # noqa: F811
    """USR1 while the batch shell is still setting up (DISTTHINK_SETUP sleeps in the first launch): it must
    not kill the shell (USR1's default action), which would end the job without a requeue. The job requeues
    at once, starting nothing, and the next launch runs the training to the end."""
    out = workdir / "early"
    job = sbatch_template(slurm_cluster, workdir, out, "--nodes=2", "--gpus-per-node=0",
                          DISTTHINK_SETUP='[ "${SLURM_RESTART_COUNT:-0}" != 0 ] || sleep 6')
    deadline = time.monotonic() + 60
    while not list(workdir.glob(f"*-{job}.out")):  # the batch shell has started
        assert time.monotonic() < deadline, describe(slurm_cluster, workdir, job, out)
        time.sleep(0.2)
    time.sleep(1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = finished(slurm_cluster, workdir, job, out, 240)
    detail = describe(slurm_cluster, workdir, job, out)
    assert info.state == "COMPLETED" and info.rc == 0 and info.restarts == 1, detail
    log = job_log(workdir, job)
    assert "received SIGUSR1 before training started" in log, detail
    assert f"preempted before training started: requeueing job {job} (restart 1), it resumes from none" in log, detail
    assert "restart 1 on 2 node(s)" in log and "training finished (exit code 0)" in log, detail
    nodes = "\n".join(node_logs(out, job).values())
    assert "restart 0 machine_rank" not in nodes and "restart 1 machine_rank=1" in nodes, detail  # nothing ran
    assert summary(out)["steps"] == MAX_STEPS, detail
