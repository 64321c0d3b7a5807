"""ThinkRec through real launches: the dual objective is normalised globally (invariant to ranks x micro-batch x
GA), and the pipeline prepare -> train-cf -> stage 1 (2 ranks, ZeRO-3) -> rec eval runs, with the 2-rank eval
equal to the 1-rank eval."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from _tolerance import run_metric_tol
from _train_utils import ROOT, env, free_port, launch, metrics


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    out = tmp_path_factory.mktemp("prep")
    prepare_synthetic(out, reasons="template", n_users=40, n_items=60, min_per_user=10, max_per_user=30)
    return out


def _common(prepared, out):
    return ["--config", "configs/thinkrec/smoke.yaml", f"data.train={prepared / 'train.parquet'}",
            f"data.eval={prepared / 'valid.parquet'}", f"train.output_dir={out}"]


@pytest.mark.slow
def test_lm_and_rec_are_each_normalised_globally(tmp_path, prepared):
    extra = ["lora.enabled=false", "checkpoint.export=none", "train.lr=1e-2", "train.max_steps=3",
             "train.max_grad_norm=1000", "task.options.reason_ratio=0.5", "task.options.max_train_samples=64",
             "data.eval=null", "loss.impl=hf"]

    def run(name, nproc, micro, ga):
        out = tmp_path / name
        launch(_common(prepared, out) + extra + [f"batch.samples_per_micro={micro}",
                                                f"batch.gradient_accumulation={ga}"], nproc=nproc)
        return metrics(out)

    ref = run("r1_m4_ga1", 1, 4, 1)
    for label, other in (("1x1x4", run("r1_m1_ga4", 1, 1, 4)), ("2x1x2", run("r2_m1_ga2", 2, 1, 2))):
        for a, b in zip(ref, other, strict=True):
            for key in ("loss_lm", "loss_rec", "grad_norm"):  # fp32 sums over the step's tokens, other order
                assert abs(a[key] - b[key]) <= run_metric_tol(a[key], a["tokens"]), (label, a["step"], key, a[key],
                                                                                    b[key])
    # the logged loss is this very float64 sum: rel=1e-6 only spares a rounding, a missing term is O(1)
    assert ref[0]["loss"] == pytest.approx(ref[0]["loss_lm"] + ref[0]["loss_rec"], rel=1e-6)


def _eval(args, nproc=1):
    cli = [sys.executable, "-m", "distthink", "rec", "eval", *args]
    if nproc > 1:
        cli = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "distthink", "rec", "eval", *args]
    p = subprocess.run(cli, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_pipeline_prepare_cf_stage1_zero3_eval(tmp_path, prepared):
    cf = tmp_path / "cf"
    p = subprocess.run([sys.executable, "-m", "distthink", "rec", "train-cf", "--data", str(prepared), "--out",
                        str(cf), "--epochs", "5", "--no-progress"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "stage1"
    launch(_common(prepared, out) + ["distributed.deepspeed=ds_configs/zero3.json"], nproc=2)
    rows = metrics(out)
    assert len(rows) == 4 and all("loss_rec" in r and "loss_lm" in r for r in rows)
    args = ["--config", "configs/thinkrec/smoke.yaml", "--export", str(out / "export"), "--split",
            str(prepared / "test.parquet"), "--limit", "30", "--cf", str(cf), "--scores", str(tmp_path / "s.parquet"),
            f"data.train={prepared / 'train.parquet'}", f"data.eval={prepared / 'valid.parquet'}"]
    one = _eval(args)
    scores = pd.read_parquet(tmp_path / "s.parquet")
    assert len(scores) == 30 and scores["sample_index"].tolist() == list(range(30))
    two = _eval(args, nproc=2)
    for key in ("auc", "uauc", "ndcg@5", "hr@1"):  # ratios of counts of ordered scores: equal unless 2 scores swap
        assert one["llm"][key] == pytest.approx(two["llm"][key], abs=1e-9, nan_ok=True)
    assert one["llm"]["n"] == two["llm"]["n"] == 30 and "cf" in one

    # Stage 2: ids + projector, stage 1's adapter loaded by path and frozen (2 ranks, ZeRO-3). The frozen
    # adapter is exported again: it must equal stage 1's bit for bit (loaded, and never updated).
    out2 = tmp_path / "stage2"
    stage2 = _common(prepared, out2) + [
        "distributed.deepspeed=ds_configs/zero3.json", "task.options.prompt_mode=ids",
        f"task.options.cf_export={cf}", f"task.options.init_adapter={out / 'export'}", "task.options.freeze_lora=true"]
    proc2 = launch(stage2, nproc=2)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "export/adapter_model.safetensors")), load_file(str(out2 / "export/adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
    rows2 = metrics(out2)
    assert len(rows2) == 4 and all(r["grad_norm"] > 0 for r in rows2)  # only the projector learns

    # The export holds the trained projector, gathered from the ZeRO-3 partitions: equal to the last
    # checkpoint's projector consolidated independently by DeepSpeed's zero_to_fp32 from the optimizer shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    ex2 = out2 / "export"
    exported = load_file(str(ex2 / "projector.safetensors"))
    from distthink.engine.checkpoint import read_latest

    step_dir = read_latest(out2 / "checkpoints")  # the final step's checkpoint; DeepSpeed's own tag file inside
    full = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=(step_dir / "latest").read_text().strip())
    ref = {k[len("projector."):]: v for k, v in full.items() if k.startswith("projector.")}
    assert sorted(exported) == sorted(ref) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert all(torch.equal(exported[k], ref[k].float()) for k in ref)
    assert "(gathered from its ZeRO-3 partitions)" in proc2.stdout + proc2.stderr  # the collective path ran
    from distthink.models.inject import Projector

    torch.manual_seed(0)  # build_wrapper's init: the exported tensors are trained ones, not the init
    init = Projector(64, 64, mult=5, activation="relu").state_dict()
    assert not torch.equal(init["net.2.weight"], exported["net.2.weight"])
    meta = json.loads((ex2 / "projector.json").read_text())
    assert meta["d_in"] == 64 and meta["k"] == 1 and meta["cf_export"] == str(cf.resolve())
    # `rec eval --export` of stage 2 alone (projector from the export) == the old `--projector CHECKPOINT` path
    save_file({f"projector.{k}": v.contiguous() for k, v in ref.items()}, str(tmp_path / "ckpt_proj.safetensors"))
    ev = ["--config", "configs/thinkrec/smoke.yaml", "--split", str(prepared / "test.parquet"), "--limit", "16",
          *stage2[2:], "--export", str(ex2)]
    by_export = _eval(ev + ["--scores", str(tmp_path / "e.parquet")])
    by_ckpt = _eval(ev + ["--scores", str(tmp_path / "c.parquet"), "--projector", str(tmp_path / "ckpt_proj.safetensors")])
    assert by_export == by_ckpt
    e, c = pd.read_parquet(tmp_path / "e.parquet"), pd.read_parquet(tmp_path / "c.parquet")
    assert len(e) == 16 and e["score"].tolist() == c["score"].tolist()

