"""Ulysses sequence parallelism on 2 real processes (gloo, CPU): one packed row of three samples whose cut point
falls inside a sample, SP=2 against the SP=1 loss and gradients of the same row (tests/_sp_worker.py).

The all-to-alls are DeepSpeed's (UlyssesSPAttentionHF, registered as accelerate registers it); the attention core
is distthink's packed one. Also covered: the dynamic think modes with a `</think>` predicted on shard 0 inside a
sample whose answer continues on shard 1. Leaky variants must fail: no think-state exchange between shards, and
the stock Ulysses core (no mask, so the packed samples attend to each other)."""

import json
import subprocess
import sys

import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol
from _train_utils import ROOT, env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "sp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(ROOT / "tests" / "_sp_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


def _tols(v, tokens):
    """float32 forward/backward of the tiny decoder over a row of `tokens` (attention sums of that length), the
    loss a sum over the row: fp_tol with k = 18 chained reductions x the row length, on each side's magnitude."""
    k = max(TINY_DECODER_K, 18 * tokens)
    return fp_tol(torch.float32, abs(v["ref_loss"]), k=k), fp_tol(torch.float32, v["grad_max_abs"], k=k)


def test_layout_of_the_case(results):
    # the cut (64) falls inside sample 1 (positions 37..86); </think> first predicted at 50 in that sample
    assert results["world"] == 2 and results["cut"] == 64 and results["tokens"] == 128
    assert 37 + 3 <= results["think_pos"] < 64


@pytest.mark.parametrize("name", ["plain", "argmax", "soft"])
def test_sp2_equals_sp1_loss_and_gradients(results, name):
    v = results["variants"][name]
    loss_tol, grad_tol = _tols(v, results["tokens"])
    assert abs(v["loss"] - v["ref_loss"]) <= loss_tol, v
    assert v["grad_max_abs_diff"] <= grad_tol, v


def test_the_think_modes_change_the_loss(results):
    """Otherwise the dynamic cases could not tell a passed think state from none."""
    plain, argmax, soft = (results["variants"][k]["ref_loss"] for k in ("plain", "argmax", "soft"))
    assert argmax < plain - 1 and soft < plain - 1 and abs(argmax - soft) > 1


@pytest.mark.parametrize("name", ["argmax_no_exchange", "soft_no_exchange", "stock_core"])
def test_leaky_variants_fail(results, name):
    v = results["variants"][name]
    _, grad_tol = _tols(v, results["tokens"])
    assert v["grad_max_abs_diff"] > 100 * grad_tol, v
