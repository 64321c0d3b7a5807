"""`distthink slurm render` and the templates, without a cluster (the cluster runs are in
tests/launch/test_slurm_cluster.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distthink import cli
from distthink.errors import ConfigError
from distthink.launch.slurm import LAUNCHER_BEGIN, TEMPLATES, RenderOptions, launcher_path, node_script, render
from distthink.resources import SLURM_TEMPLATES


def sbatch_options(script: str) -> dict[str, str]:
    """#SBATCH options in the header, as sbatch reads them (up to the first command line)."""
    out = {}
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_are_valid_requeueable_sbatch_scripts(template):
    text = (SLURM_TEMPLATES / f"{template}.sbatch").read_text()
    opts = sbatch_options(text)
    assert opts["nodes"] == "1" and opts["ntasks-per-node"] == "1"
    assert "requeue" in opts and opts["signal"].startswith("B:USR1@")
    assert opts["open-mode"] == "append"  # the requeued run appends to the same job log
    assert subprocess.run(["bash", "-n", str(SLURM_TEMPLATES / f"{template}.sbatch")]).returncode == 0
    # the documented settings are at the top of the file
    for name in ("DISTTHINK_CONFIG", "DISTTHINK_OUTPUT_DIR", "DISTTHINK_ACCELERATE_CONFIG", "--gpus-per-node",
                 "--nodes"):
        assert name in text.split("\n#SBATCH ")[0], name


def test_launcher_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(launcher_path())]).returncode == 0


@pytest.mark.parametrize("template", TEMPLATES)
def test_render_fills_options_and_inlines_the_launcher(template, tmp_path):
    text = render(RenderOptions(template=template, nodes=2, gpus_per_node=8, config="configs/x.yaml",
                                output_dir="runs/x", partition="gpu", time="48:00:00", signal_grace_s=900,
                                overrides=["train.lr=1e-4", "lora.r=16"]))
    opts = sbatch_options(text)
    assert opts["nodes"] == "2" and opts["gpus-per-node"] == "8" and opts["partition"] == "gpu"
    assert opts["time"] == "48:00:00" and opts["signal"] == "B:USR1@900"
    assert "export DISTTHINK_CONFIG=configs/x.yaml" in text
    assert "export DISTTHINK_OUTPUT_DIR=runs/x" in text
    assert "export DISTTHINK_OVERRIDES='train.lr=1e-4 lora.r=16'" in text
    # self-contained: the launcher is inlined, nothing execs slurm/launch.sh
    assert "exec bash" not in text and LAUNCHER_BEGIN not in text
    body = launcher_path().read_text().split("\n", 1)[1].strip()
    assert body in text
    path = tmp_path / f"{template}.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_machine_rank_expands_per_task_not_in_the_batch_shell():
    """The classic pitfall: `--machine_rank $SLURM_NODEID` written in the batch shell expands once
    (to the batch node's 0) for every node. It must sit in the single-quoted per-node here-doc."""
    text = render(RenderOptions(nodes=2, gpus_per_node=8))
    node = node_script(text)
    assert '--machine_rank "$SLURM_NODEID"' in node
    assert '--num_machines "$SLURM_NNODES"' in node
    assert "<<'NODE_SCRIPT'" in text  # quoted delimiter: bash does no expansion in the body
    batch_code = [line for line in text.replace(node, "").splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in batch_code if "SLURM_NODEID" in line]
    # and bash really keeps it literal: evaluate the here-doc assignment alone
    m = re.search(r"read -r -d '' DISTTHINK_NODE_SCRIPT <<'NODE_SCRIPT'\n.*?\nNODE_SCRIPT\n", text, re.S)
    probe = m.group(0) + 'printf %s "$DISTTHINK_NODE_SCRIPT"'
    out = subprocess.run(["bash", "-c", probe], env={"SLURM_NODEID": "BATCH", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True).stdout
    assert '--machine_rank "$SLURM_NODEID"' in out and "BATCH" not in out


def test_node_script_forwards_preemption_and_runs_one_task_per_node():
    text = launcher_path().read_text()
    assert "--kill-on-bad-exit=1" in text and "--ntasks-per-node=1" in text
    assert "scontrol requeue" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    node = node_script(text)
    assert "--rdzv_backend c10d" in node
    assert "trap 'forward USR1' USR1" in node


def test_cpu_render_drops_the_gpu_request():
    text = render(RenderOptions(nodes=1, gpus_per_node=0, cpu_procs_per_node=2))
    assert "gpus-per-node" not in sbatch_options(text)
    assert "export DISTTHINK_GPUS_PER_NODE=0" in text and "export DISTTHINK_CPU_PROCS_PER_NODE=2" in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(template="nope"), "unknown SLURM template"),
    (dict(nodes=0), "--nodes must be >= 1"),
    (dict(gpus_per_node=-1), "--gpus-per-node must be >= 0"),
    (dict(overrides=["train.lr"]), "not key=value"),
])
def test_render_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        render(RenderOptions(**kwargs))


def test_cli_render_prints_and_writes(capsys, tmp_path):
    assert cli.main(["slurm", "render", "--template", "stage3", "--nodes", "2", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=4" in out
    assert "export DISTTHINK_CONFIG=\"${DISTTHINK_CONFIG-configs/thinkrec/stage3.yaml}\"" in out
    target = tmp_path / "job.sbatch"
    assert cli.main(["slurm", "render", "--nodes", "3", "-o", str(target)]) == 0
    assert "#SBATCH --nodes=3" in target.read_text() and target.stat().st_mode & 0o111
    assert cli.main(["slurm", "render", "--template", "nope"]) == 2
    assert "unknown SLURM template" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_launcher():
    assert subprocess.run(["shellcheck", "-S", "error", str(launcher_path())]).returncode == 0


def test_launcher_outside_slurm_fails_with_the_fix():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(launcher_path())], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "not inside a SLURM job. Fix: submit with sbatch" in p.stderr


def test_every_template_has_a_byte_equal_copy_in_the_repository_slurm_folder():
    """`sbatch slurm/X.sbatch` from a checkout runs what the package ships (distthink/launch/templates)."""
    repo = Path(__file__).resolve().parents[2] / "slurm"
    shipped = sorted(p.name for p in SLURM_TEMPLATES.iterdir() if p.is_file())
    assert shipped == sorted(p.name for p in repo.iterdir() if p.is_file())
    for name in shipped:
        assert (repo / name).read_bytes() == (SLURM_TEMPLATES / name).read_bytes(), name


def test_prepare_sbatch_is_a_cpu_job_that_builds_the_cache(tmp_path):
    script = SLURM_TEMPLATES / "prepare.sbatch"
    opts = sbatch_options(script.read_text())
    assert opts["nodes"] == "1" and int(opts["cpus-per-task"]) > 1 and "gpus-per-node" not in opts
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DISTTHINK_ROOT=str(Path(__file__).resolve().parents[2]), DISTTHINK_CACHE_DIR=str(tmp_path / "cache"),
               DISTTHINK_OVERRIDES="data.eval=null data.max_train_samples=40 data.num_proc=1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # the environment, activated
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "train: 40 samples from 40 records" in p.stdout
    assert len([d for d in (tmp_path / "cache").iterdir() if (d / "meta.json").is_file()]) == 1
