"""Integration tests on a real local SLURM cluster (tests/slurm_cluster.py): two slurmd on this host,
so multi-node code paths (SLURM_NODEID per node, srun one task per node) run for real."""

from __future__ import annotations

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


def test_cluster_runs_one_task_per_node(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        "-N", "2", "-o", str(out),
        "--wrap", "srun --ntasks-per-node=1 bash -c 'echo node=$SLURM_NODEID name=$SLURMD_NODENAME'")
    info = slurm_cluster.wait_job(job, timeout=60)
    assert info.state == "COMPLETED" and info.rc == 0, info
    lines = sorted(line for line in out.read_text().splitlines() if line.startswith("node="))
    assert lines == [f"node={i} name={n}" for i, n in enumerate(slurm_cluster.nodes)]
