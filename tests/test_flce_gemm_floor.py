"""Smoke test for benchmarks/flce_gemm_floor.py: it runs end to end at a tiny shape and its JSON adds up.

No timing is asserted (timings belong to the script, not to CI); what is checked is the bookkeeping the
docs quote: per-chunk parts sum to the total, and floor_ratio = total / full-height total."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
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
            assert r["total_s"] == pytest.approx(sum(r["parts_s"].values()), abs=3e-6)
            assert r["floor_ratio"] == pytest.approx(r["total_s"] / shape["full_total_s"], rel=0.01, abs=2e-3)
