"""End to end through the shipped scripts. In CI: the quick all-stages run (QUICK=1, ~2.5 min), which also checks
that stage 1 beats MF. Opt-in (DISTTHINK_FULL_DEMO=1, ~5 min on 2 cores): the #5 acceptance run of
scripts/thinkrec_demo.sh, rec synth -> prepare -> train-cf (MF) -> stage 1 (2 ranks, ZeRO-3, 150 steps) -> rec eval,
where stage 1's test AUC beats MF's on the whole test split (figures in docs/thinkrec.md)."""

import json
import math
import os
import subprocess
import sys

import pytest
from _train_utils import ROOT, env


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(os.environ.get("DISTTHINK_FULL_DEMO") != "1",
                    reason="opt-in (~5 min): set DISTTHINK_FULL_DEMO=1; the quick all-stages run below covers it in CI")
def test_demo_script_stage1_beats_mf(tmp_path):
    e = env(STEPS="150")
    # the script calls the `distthink`/`accelerate` console scripts: those next to this interpreter
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", "")])
    p = subprocess.run(["bash", "scripts/thinkrec_demo.sh", str(tmp_path / "demo")], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=1400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(p.stdout.strip().splitlines()[-2])  # "test AUC: stage 1 ... vs MF ..."
    assert res["n"] == 1252  # the whole test split was scored (2-rank gather is checked in test_thinkrec_pipeline)
    assert 0.6 < res["mf_auc"] < 0.72  # MF learns something, the regime stays sparse
    assert res["stage1_auc"] > res["mf_auc"] + 0.03, res
    scores = tmp_path / "demo" / "test_scores.parquet"
    assert scores.is_file()
    # stage 1 was a real 2-rank ZeRO-3 run
    summary = json.loads((tmp_path / "demo" / "stage1" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["steps"] == 150


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_full_quick_every_stage(tmp_path):
    """The all-stages script (QUICK=1: 300-user world, 40/20/20 steps, one process, 200 test rows): MF, stage 1,
    stage 2, rec group, stage 3, rec eval --fusion and rec explain all run and print one table. Checks that can
    fail: stage 2 still scores (a wrong tokenizer or projector drops it to chance), stage 3's global adapter is
    stage 2's adapter untouched (hard routing sends every user of the table to an expert), the trained experts
    change the scores, the branch counts cover the rows, and rec explain reads its Yes-probability from the
    scored position."""
    e = env(QUICK="1")
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", "")])
    out = tmp_path / "full"
    p = subprocess.run(["bash", "scripts/thinkrec_demo_full.sh", str(out)], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=850)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    lines = p.stdout.strip().splitlines()
    print("\n".join(lines[-10:-1]))  # the table
    res = json.loads(lines[-1])
    assert res["n"] == 200 and sum(res["branch_counts"].values()) == 200
    assert res["stage1"] > 0.6 and res["stage2"] > 0.6, res
    assert res["stage1"] > res["mf"] + 0.03, res  # measured 0.779 vs 0.676 (docs/thinkrec.md)
    assert abs(res["stage3_global"] - res["stage2"]) < 1e-3, res
    for mode in ("stage3_hard", "stage3_fusion"):
        assert abs(res[mode] - res["stage3_global"]) > 1e-4, res
    recs = [json.loads(x) for x in (out / "explain.jsonl").read_text().splitlines()]
    assert len(recs) == res["explain"]["rows"] == 8
    assert all(abs(r["yes_prob"] - 1 / (1 + math.exp(-r["score"]))) < 1e-12 and r["gate_branch"] for r in recs)


@pytest.mark.parametrize("script", ["scripts/thinkrec_demo.sh", "scripts/thinkrec_demo_full.sh"])
def test_demo_script_passes_shellcheck(script):
    import shutil

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    p = subprocess.run(["shellcheck", script], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
