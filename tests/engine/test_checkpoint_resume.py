"""Exact resume under DeepSpeed ZeRO-3 + CPU offload with LoRA (2 ranks, gloo):

1. an uninterrupted run (checkpoint every 4 steps) learns, exits 0, really partitions the model, exports
   a PEFT adapter that plain peft loads (no empty tensors) and that `distthink check` accepts;
2. the same run where rank 1 is SIGKILLed before step 7 dies (non-zero exit), leaving step-4 as latest;
3. relaunched with checkpoint.resume=auto it continues from step 4 and its steps 5..N equal the
   uninterrupted run's exactly (same topology, data order, RNG and thread count: LoRA dropout is on).
"""


import pytest
from _train_utils import FAST, launch, metrics, summary

pytestmark = pytest.mark.slow

STEPS = 10
COMMON = FAST + [f"train.max_steps={STEPS}", "lora.enabled=true", "lora.dropout=0.1", "train.lr=2e-2",
                 "train.warmup_steps=1", "checkpoint.every_steps=4", "batch.max_tokens=1024",
                 "batch.gradient_accumulation=2", "distributed.deepspeed=ds_configs/zero3_offload.json",
                 "checkpoint.resume=auto"]


def test_zero3_offload_lora_kill_and_resume_is_exact(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    launch(COMMON + [f"train.output_dir={ref_dir}"], nproc=2)
    ref = metrics(ref_dir)
    s = summary(ref_dir)
    assert s["steps"] == STEPS and s["world_size"] == 2 and s["zero_stage"] == 3 and s["zero3_partitioned"]
    first, last = sum(r["loss"] for r in ref[:3]) / 3, sum(r["loss"] for r in ref[-3:]) / 3
    assert last < first, (first, last)

    # The export is a plain PEFT adapter: non-empty tensors, loadable by peft onto the exported base.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    export = ref_dir / "export"
    adapter = load_file(str(export / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)  # trained, not init
    base = AutoModelForCausalLM.from_pretrained(str(export / "base_model"))
    model = PeftModel.from_pretrained(base, str(export))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(adapter)
    from distthink.engine.check import check_path

    assert check_path(ref_dir) == []

    # Kill rank 1 (SIGKILL) before step 7: the run fails, step-4 is the latest complete checkpoint.
    proc = launch(COMMON + [f"train.output_dir={run_dir}"], nproc=2, check=False,
                  DISTTHINK_FAULT_KILL_AT_STEP="7:1")
    assert proc.returncode != 0
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000004"

    proc = launch(COMMON + [f"train.output_dir={run_dir}"], nproc=2)
    assert "(step 4)" in proc.stderr and "resumed from" in proc.stderr  # really resumed, not restarted
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(ref, resumed):
        # bit-identical by construction (same ops, order and inputs; measured: every step equal): any tolerance
        # would hide a lossy round trip of the weights, optimizer state or RNG
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == b["grad_norm"], (a["step"], a["grad_norm"], b["grad_norm"])
    assert summary(run_dir)["steps"] == STEPS
