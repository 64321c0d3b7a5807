"""The recipe with Ulysses sequence parallelism (distributed.sequence_parallel) on real gloo processes: the loss and
grad-norm trajectories equal those of the run without SP on the same global batch, within run_metric_tol.

Rows are packed up to 256 tokens from the bundled data (several samples per row, so the shard cut falls inside
samples), GA 2, four steps. SP=2 on 2 ranks (DP 1) is compared with 1 rank; SP=2 x DP 2 on 4 ranks with 2 DDP
ranks. ZeRO-2 and ZeRO-3 are both covered because DeepSpeed divides the gradients by DP under ZeRO-2 and by the
world size under ZeRO-3 (distthink.engine.sequence_parallel.gradient_divisor); a grad norm off by N shows up at
once. Leaky variants (DISTTHINK_FAULT_SP_LEAK: each shard keeping the whole row's normaliser, or the other stage's
divisor) must fail the same comparison. The shipped long-context config runs as a tiny CPU analogue."""

import math

import pytest
from _tolerance import run_metric_tol
from _train_utils import FAST, ROOT, launch, metrics, summary

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = FAST + [f"train.max_steps={STEPS}", "batch.max_tokens=256", "data.max_length=256",
                 "batch.gradient_accumulation=2", "lora.enabled=false", "checkpoint.export=none",
                 "checkpoint.resume=never", "train.lr=1e-2", "train.warmup_steps=1", "train.max_grad_norm=1000"]
Z2, Z3 = "distributed.deepspeed=ds_configs/zero2.json", "distributed.deepspeed=ds_configs/zero3.json"
SP2 = "distributed.sequence_parallel=2"


def _run(tmp_path, name, nproc, extra=(), **env):
    out = tmp_path / name
    launch(COMMON + [f"train.output_dir={out}", *extra], nproc=nproc, **env)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def _differences(ref, other):
    """The (step, key, a, b) pairs outside the tolerance; learned tokens and weight totals must be identical."""
    bad = []
    for a, b in zip(ref, other):
        for key in ("learned_tokens", "tokens"):
            if a[key] != b[key]:
                bad.append((a["step"], key, a[key], b[key]))
        if not math.isclose(a["weight_sum"], b["weight_sum"], abs_tol=1e-6):
            bad.append((a["step"], "weight_sum", a["weight_sum"], b["weight_sum"]))
        for key in ("loss", "grad_norm"):
            if not abs(a[key] - b[key]) <= run_metric_tol(a[key], a["tokens"]):
                bad.append((a["step"], key, a[key], b[key]))
    return bad


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ref"), "ref", 1)


@pytest.mark.parametrize("label, extra", [
    ("ZeRO-3", [Z3, SP2]),
    ("ZeRO-2", [Z2, SP2]),
    ("ZeRO-3 + optimizer and parameter offload", ["distributed.deepspeed=ds_configs/zero3_offload.json", SP2]),
])
def test_sp2_equals_one_rank(tmp_path, one_rank, label, extra):
    rows = _run(tmp_path, "sp", 2, extra)
    assert not _differences(one_rank, rows), (label, _differences(one_rank, rows))
    assert one_rank[-1]["loss"] < one_rank[0]["loss"]  # and the run learns


def test_sp2_tiled_mlp_equals_one_rank_untiled(tmp_path):
    """model.tiled_mlp under ZeRO-3 with MLP weights above stage3_param_persistence_threshold (64 x 256 > 1e4), so
    every tile's recomputation gathers them: the same trajectory as the untiled MLP on one rank."""
    wide = ["model.config_overrides={intermediate_size: 256}"]
    ref = _run(tmp_path, "ref_wide", 1, wide)
    rows = _run(tmp_path, "sp_tiled", 2, [Z3, SP2, "model.tiled_mlp=3", *wide])
    assert not _differences(ref, rows), _differences(ref, rows)


def test_sp2_with_lora_equals_one_rank_lora(tmp_path):
    # no dropout: its masks come from per-rank RNG streams, which differ with any change of ranks (SP or DP)
    lora = ["lora.enabled=true", "lora.dropout=0.0",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    ref = _run(tmp_path, "ref_lora", 1, lora)
    rows = _run(tmp_path, "sp_lora", 2, [Z3, SP2, *lora])
    assert not _differences(ref, rows), _differences(ref, rows)


@pytest.mark.parametrize("zero", [Z3, Z2])
def test_sp2_times_dp2_on_four_ranks_equals_two_ddp_ranks(tmp_path, zero):
    ref = _run(tmp_path, "ddp2", 2)
    rows = _run(tmp_path, "sp2dp2", 4, [zero, SP2])
    assert not _differences(ref, rows), _differences(ref, rows)
    assert summary(tmp_path / "sp2dp2")["sequence_parallel"] == 2


@pytest.mark.parametrize("leak, key", [("normaliser", "loss"), ("scale", "grad_norm")])
def test_leaky_variants_fail(tmp_path, one_rank, leak, key):
    rows = _run(tmp_path, f"leak_{leak}", 2, [Z3, SP2], DISTTHINK_FAULT_SP_LEAK=leak)
    assert any(d[1] == key for d in _differences(one_rank, rows)), leak


def test_shipped_long_context_config_runs_as_a_tiny_cpu_analogue(tmp_path):
    """configs/qwen3_8b_long_sp.yaml with only the model, the row length and the data made tiny: SP, ZeRO-3,
    packing, tiled MLP and gradient checkpointing as shipped (SP 2 instead of 8: the tiny model has 4 heads)."""
    out = tmp_path / "long"
    tiny = ["model.name_or_path=null", "model.from_config=tiny-qwen3", "model.tokenizer=tiny", "data.train=bundled",
            "data.eval=null", "data.max_length=256", "batch.max_tokens=512", "train.max_steps=2", "train.device=cpu",
            "model.dtype=float32", SP2, "logging.progress=false", "logging.tensorboard=false",
            "logging.plot=false", "checkpoint.export=none", f"train.output_dir={out}"]
    launch(["--config", str(ROOT / "configs" / "qwen3_8b_long_sp.yaml"), *tiny], nproc=2)
    s = summary(out)
    assert s["steps"] == 2 and s["sequence_parallel"] == 2 and s["zero_stage"] == 3 and s["zero3_partitioned"]
    assert math.isfinite(s["final_loss"])


def test_sp2_run_killed_and_resumed_continues_exactly(tmp_path, one_rank):
    """A checkpoint taken under SP 2 (DeepSpeed's SP groups in place) resumes at SP 2 onto the same trajectory.
    (Resuming onto another SP degree or world size is not covered here.)"""
    out = tmp_path / "killed"
    extra = [Z3, SP2, f"train.output_dir={out}", "checkpoint.every_steps=2", "checkpoint.resume=auto"]
    first = launch(COMMON + extra, nproc=2, check=False, DISTTHINK_FAULT_KILL_AT_STEP="3:1")
    assert first.returncode != 0 and (out / "checkpoints" / "step-00000002").exists()
    launch(COMMON + extra, nproc=2)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert not _differences(one_rank, rows), _differences(one_rank, rows)


def test_evaluation_under_sp_equals_one_rank(tmp_path):
    """Eval batches are sharded like training ones (accelerate's sp_disable_in_eval is off): the same eval loss."""
    ev = ["train.max_steps=2", "data.eval=bundled", "data.max_eval_samples=20"]
    losses = []
    for name, nproc, extra in (("ref", 1, []), ("sp", 2, [Z3, SP2])):
        out = tmp_path / name
        launch(COMMON + [f"train.output_dir={out}", *ev, *extra], nproc=nproc)
        losses.append(summary(out)["eval_loss"])
    tol = run_metric_tol(losses[0], 20 * 50)  # 20 eval samples of ~50 tokens
    assert math.isfinite(losses[0]) and abs(losses[0] - losses[1]) <= tol, losses
