"""Helpers of the training tests: launch the real recipe as subprocesses (1 or 2 ranks, gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fast: the bundled data, tiny Qwen3, no TensorBoard/plot unless a test wants them.
FAST = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "eval.every_steps=0",
        "data.eval=null"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "distthink.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "distthink.train", *overrides]


def launch(overrides: list[str], nproc: int = 1, timeout: float = 300, check: bool = True, **env_extra):
    proc = subprocess.run(command(overrides, nproc), cwd=ROOT, env=env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-8000:]}")
    return proc


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def summary(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())
