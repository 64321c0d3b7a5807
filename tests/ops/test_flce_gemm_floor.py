"""Smoke test for benchmarks/flce_gemm_floor.py: it runs end to end at a tiny shape and its JSON adds up.

No timing is asserted (timings belong to the script, not to CI); what is checked is the bookkeeping the
docs quote: per-chunk parts sum to the total, and floor_ratio = total / full-height total."""

import json
import sys
from pathlib import Path

import pytest
from _tolerance import fp_tol

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import flce_gemm_floor  # noqa: E402


def test_gemm_floor_json_is_consistent(capsys):
    assert flce_gemm_floor.main(["--shape", "64,32", "--chunks", "16,64", "--repeats", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["benchmark"] == "flce_gemm_floor"
    (shape,) = summary["shapes"]
    assert (shape["N"], shape["H"], shape["V"]) == (64, 32, flce_gemm_floor.V_QWEN3)
    assert [row["chunk"] for row in shape["chunks"]] == [16, 64]
    assert summary["chunk"] == 16 and summary["floor_ratio"] == shape["chunks"][0]["rows"]["floor_ratio"]
    for row in shape["chunks"]:
        for layout in ("rows", "rows_T"):
            r = row[layout]
            # bookkeeping, not float error: 3 parts and the total are each rounded to 1e-6 s (<= 2e-6 apart)
            assert r["total_s"] == pytest.approx(sum(r["parts_s"].values()), abs=3e-6)
            # the ratio is rounded to 3 decimals from unrounded times; the times here are rounded to 1e-6 s (~1%)
            assert r["floor_ratio"] == pytest.approx(r["total_s"] / shape["full_total_s"], rel=0.01, abs=2e-3)


def test_alternative_schedules_compute_the_same_gradients():
    """The schedules compared with --schedules do the same arithmetic (else their timings mean nothing):
    grad_weight summed over the chunks and the last chunk's softmax @ W agree with the plain loop."""
    import torch

    torch.manual_seed(0)
    v, h, n, c = 1000, 24, 48, 16
    weight, hidden = torch.randn(v, h) * 0.3, torch.randn(n, h)
    gw_plain = torch.zeros(v, h)
    gh_plain = flce_gemm_floor._plain(weight, hidden, gw_plain, c)
    # naive float64 check of the plain loop itself
    p = torch.softmax(hidden.double() @ weight.double().t(), 1)
    want_w, want_h = p.t() @ hidden.double(), p[-c:] @ weight.double()
    # fp32 chains of reductions over h (logits), v (softmax) and n or v (the GEMM), scaled by sum|terms|
    k = h + v + n
    tol_w = fp_tol(torch.float32, (p.t() @ hidden.double().abs()).max(), k=k)
    tol_h = fp_tol(torch.float32, (p[-c:] @ weight.double().abs()).max(), k=k)
    assert (gw_plain.double() - want_w).abs().max() <= tol_w
    assert (gh_plain.double() - want_h).abs().max() <= tol_h
    for defer in (False, True):
        gw = torch.zeros(v, h)
        gh = flce_gemm_floor._tiled(weight, hidden, gw, c, tile=300, defer_grad_weight=defer)
        assert (gw - gw_plain).abs().max() <= tol_w and (gh - gh_plain).abs().max() <= tol_h


def test_schedules_option_runs(capsys):
    assert flce_gemm_floor.main(["--shape", "64,32", "--chunks", "32", "--repeats", "1", "--schedules"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sched = summary["shapes"][0]["schedules"]
    assert sched["chunk"] == 32 and sched["plain_s"] > 0
    assert {"tile_fused_4096_s", "tile_deferred_4096_s", "logits_plain_s"} <= set(sched)
