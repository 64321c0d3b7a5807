"""bf16 with DeepSpeed ZeRO-2 / ZeRO-3 on 2 ranks (real DeepSpeed, gloo, DS_ACCELERATOR=cpu): each task's GPU
recipe trains a few steps through the real trainer, with dtype probes (tests/_dtype_worker.py).

What DeepSpeed does to dtypes, and what must hold after it:
- ZeRO-2 casts every parameter of the prepared module to bf16 (fp32 master copies in its optimizer) and no buffer:
  ThinkRec's fp32 CF tables meet a bf16 projector (defect 2: `mat1 and mat2 must have the same dtype`);
- ZeRO-3 keeps what zero.Init built (a bf16 base) and converts the modules built outside it without a cast, and
  its flat partitions take one dtype: fp32 LoRA next to a bf16 graph encoder failed at `prepare` (defect 7).
In every case the LM-head loss computes in bf16 and sums in fp32."""

import json
import subprocess
import sys

import pytest
from _train_utils import FAST, ROOT, env, free_port, metrics
from _worlds import thinkrec_overrides, thinkrec_world

pytestmark = pytest.mark.slow
BF16 = ["model.dtype=bfloat16", "checkpoint.export=none", "train.max_steps=3", "batch.shuffle=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return thinkrec_world(tmp_path_factory.mktemp("zero_world"))


def _launch(tmp_path, config: str, overrides: list[str]) -> list[dict]:
    out = tmp_path / "run"
    prefix = tmp_path / "dtypes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(ROOT / "tests" / "_dtype_worker.py"),
           str(prefix), config, *FAST, *BF16, f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = metrics(out)
    assert len(rows) == 3 and all(r["grad_norm"] > 0 and r["loss"] == r["loss"] for r in rows), rows
    return [json.loads((tmp_path / f"dtypes.rank{r}.json").read_text()) for r in (0, 1)]


CASES = {
    # name: (stage, extra overrides, trainable dtypes, side-module dtypes)
    "sft_lora_zero3": ("sft_lora", 3, ["float32"]),
    "sft_full_zero2": ("sft_full", 2, ["bfloat16"]),
    "thinkrec_ids_zero2": ("ids", 2, ["bfloat16"]),
    "thinkrec_ids_zero3": ("ids", 3, ["float32"]),
    "molecule_lora_all_zero3": ("molecule_lora", 3, ["float32"]),
    "molora_soft_zero3": ("soft", 3, ["float32"]),
}


def _config(world, variant: str) -> tuple[str, list[str]]:
    if variant == "sft_lora":
        return "configs/default.yaml", ["lora.enabled=true"]
    if variant == "sft_full":
        return "configs/default.yaml", ["lora.enabled=false"]
    if variant == "molecule_lora":
        return "configs/molecule/cpu_smoke.yaml", ["lora.enabled=true", "data.max_train_samples=16", "data.eval=null",
                                                   "batch.samples_per_micro=4"]
    config, overrides = thinkrec_overrides(world, variant)
    return config, overrides + ["batch.samples_per_micro=2"]


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_deepspeed_two_ranks(tmp_path, world, name):
    variant, stage, trainable = CASES[name]
    config, overrides = _config(world, variant)
    records = _launch(tmp_path, config, overrides + [f"distributed.deepspeed=ds_configs/zero{stage}.json"])
    for rec in records:
        first = rec["first"]
        assert rec["exit"] == 0 and rec["head"] and all(h == ["bfloat16", "bfloat16"] for h in rec["head"]), rec
        assert set(first["sums"].values()) == {"float32"}, first
        assert first["trainable"] == trainable, first  # one dtype: ZeRO's flat partitions
        assert first["frozen_base"] in ([], ["bfloat16"]), first
        if first["side"]:
            assert first["side"] == trainable, first
        if first["cf_table"] is not None:
            assert first["cf_table"] == "float32", first  # buffers are never cast by DeepSpeed
