"""Single-process behaviour of the recipe: the embedded default path, the loss wrapper against an
independent reference, the NaN/Inf guard, preemption (SIGTERM -> save -> exit 75 -> resume) and
start-up refusal of bad configs."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol
from _train_utils import FAST, ROOT, command, env, launch, metrics, summary
from references.ce import naive_weighted_ce_sum

from distthink.engine.lm_loss import LMHeadLoss, micro_batch_scale, weighted_ce_sum


def _tiny_model(seed=0):
    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_qwen3_config(), attn_implementation="sdpa")


def test_weighted_ce_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 37, generator=g)
    targets = torch.randint(0, 37, (50,), generator=g)
    targets[::7] = -100
    weights = torch.rand(50, generator=g) * (targets != -100)
    ref = naive_weighted_ce_sum(logits, targets, weights)  # float64, rounded to fp32 once
    # fp32: a sum of 50 positive weighted CE terms, each with a 37-class lse
    assert (weighted_ce_sum(logits, targets, weights) - ref).abs() <= fp_tol(torch.float32, ref, k=50 + 37)


def test_loss_wrapper_fused_equals_hf_and_reference():
    from distthink.data.packing import collate_packed
    from distthink.data.types import EncodedSample
    from distthink.models.attention import model_inputs

    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (9, 14, 5):
        ids = torch.randint(5, 500, (n,), generator=g).tolist()
        labels = [-100] * 3 + ids[3:]
        weights = [0.0] * 3 + [0.5 + (i % 3) for i in range(n - 3)]
        samples.append(EncodedSample(ids, labels, weights))
    batch = collate_packed(samples)
    kw = model_inputs(batch, "sdpa")
    model = _tiny_model()
    losses, grads = {}, {}
    for impl in ("hf", "fused"):
        model.zero_grad()
        wrapper = LMHeadLoss(model, impl=impl, chunk_size=7)
        assert wrapper.impl == impl
        loss = wrapper(targets=batch["targets"], target_weights=batch["target_weights"], **kw)
        loss.backward()
        losses[impl] = loss.detach()
        grads[impl] = model.model.embed_tokens.weight.grad.clone()
    logits = model(**kw).logits[0]
    ref = naive_weighted_ce_sum(logits.detach(), batch["targets"][0], batch["target_weights"][0])
    # the weighted sum (no cancellation) of CE terms from one fp32 tiny-decoder forward
    tol = fp_tol(torch.float32, ref, k=TINY_DECODER_K)
    assert (losses["hf"] - ref).abs() <= tol and (losses["fused"] - ref).abs() <= tol
    # the two loss paths' gradients go back through the decoder: forward + backward chain
    assert (grads["hf"] - grads["fused"]).abs().max() <= fp_tol(torch.float32, grads["hf"].abs().max(),
                                                                  k=2 * TINY_DECODER_K)


def test_micro_batch_scale():
    assert micro_batch_scale(10.0, world_size=2, grad_accum=4) == pytest.approx(0.8)
    assert micro_batch_scale(0.0, 2, 4) == 0.0  # a step without learned tokens contributes no gradient


@pytest.mark.slow
def test_default_run_through_cli_ends_with_summary(tmp_path):
    out = tmp_path / "default"
    proc = subprocess.run([sys.executable, "-m", "distthink", "train", f"train.output_dir={out}",
                           "train.max_steps=15", "eval.every_steps=5", "checkpoint.every_steps=5",
                           "logging.progress=false"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distthink training summary" in proc.stdout and "learned tokens" in proc.stdout
    s = summary(out)
    rows = metrics(out)
    assert s["steps"] == 15 and rows[-1]["loss"] < rows[0]["loss"] - 0.5  # full FT of the tiny model learns
    assert s["eval_loss"] < rows[0]["loss"] and (out / "loss.png").exists()
    assert s["checkpoint"].endswith("step-00000015") and s["export"].endswith("export")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000015"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_last=2


def test_gradient_checkpointing_with_lora_gives_the_same_loss_and_grads():
    """models.load with gradient checkpointing + LoRA (frozen embeddings: needs enable_input_require_grads)
    trains the adapter with exactly the gradients of the plain model."""
    from distthink.config import load_config
    from distthink.data.packing import collate_packed
    from distthink.data.types import EncodedSample
    from distthink.models.attention import model_inputs
    from distthink.models.load import load_model, load_tokenizer

    g = torch.Generator().manual_seed(3)
    samples = [EncodedSample(ids, [-100] + ids[1:], [0.0] + [1.0] * (len(ids) - 1))
               for ids in (torch.randint(5, 500, (n,), generator=g).tolist() for n in (11, 7))]
    batch = collate_packed(samples)
    out = {}
    for gc in (False, True):
        cfg = load_config(None, ["lora.enabled=true", "lora.dropout=0.0", f"model.gradient_checkpointing={gc}"])
        model = load_model(cfg, load_tokenizer(cfg), "cpu", torch.float32)
        model.train()
        loss = LMHeadLoss(model, impl="fused")(targets=batch["targets"], target_weights=batch["target_weights"],
                                                **model_inputs(batch, "sdpa"))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(v.abs().sum() > 0 for k, v in grads.items() if "lora_B" in k)  # A is 0-grad at B=0
        out[gc] = (loss.detach(), grads)
    # the recomputation may take other kernels: the tiny decoder's fp32 forward (loss) / forward + backward chain
    assert (out[False][0] - out[True][0]).abs() <= fp_tol(torch.float32, out[False][0], k=TINY_DECODER_K)
    for name, grad in out[False][1].items():
        tol = fp_tol(torch.float32, grad.abs().max(), k=2 * TINY_DECODER_K)
        assert (grad - out[True][1][name]).abs().max() <= tol, name


@pytest.mark.slow
def test_nan_guard_skips_then_stops(tmp_path):
    out = tmp_path / "nan"
    base = FAST + [f"train.output_dir={out}", "train.max_steps=8", "checkpoint.export=none",
                   "checkpoint.resume=never", "train.nan_max_consecutive=2"]
    # step 2 alone is skipped and training goes on; steps 4 and 5 in a row stop the run
    proc = launch(base, check=False, DISTTHINK_FAULT_NAN_STEPS="2,4,5")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 2: non-finite loss" in proc.stderr and "(1 in a row, limit 2)" in proc.stderr
    assert "2 non-finite steps in a row: stopping" in proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # "lr" is the rate a step used: the skipped step 2 did not advance the schedule, so step 3 reuses it
    assert rows[2]["lr"] == rows[1]["lr"] > rows[0]["lr"] and rows[3]["lr"] > rows[2]["lr"]
    assert rows[2]["loss"] == rows[2]["loss"]  # step 3 trained normally (finite)


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_requeue_code_then_resumes(tmp_path):
    from distthink.engine.preemption import REQUEUE_EXIT_CODE

    out = tmp_path / "preempt"
    args = FAST + [f"train.output_dir={out}", "train.max_steps=400", "checkpoint.export=none",
                   "checkpoint.every_steps=0"]
    p = subprocess.Popen(command(args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    metrics_file = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_file.exists() or metrics_file.read_text().count("\n") < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert "preemption signal received (SIGTERM)" in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    saved_step = int(latest.split("-")[1])
    assert 3 <= saved_step < 400
    proc = launch([*args[:-3], "train.max_steps=%d" % (saved_step + 2), "checkpoint.export=none"])
    assert f"(step {saved_step})" in proc.stderr
    assert summary(out)["steps"] == saved_step + 2


def test_bad_config_refused_at_startup(tmp_path):
    proc = subprocess.run(command(["train.lrr=1"]), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown config key 'train.lrr'" in proc.stderr and "did you mean 'train.lr'" in proc.stderr
