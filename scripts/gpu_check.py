"""One GPU check for the day a GPU is at hand: every GPU-only path of distthink, each as an independent step.

    scripts/gpu_check.sh [--out gpu_check.json] [--budget-s 480] [--only A,B] [--skip C] [--workdir DIR]
    scripts/gpu_check.sh --dry-run        # on CPU: every step starts (imports, configs, command lines), < 1 min
    scripts/gpu_check.sh --list           # the steps, their time limits and expected durations

Built for one H100/H200 and under 9 minutes (the default budget, 480 s, leaves room for the machine's start).
Each step runs its commands as subprocesses with a time limit (the whole process group is killed at the limit);
a failing step does not stop the others; once the budget is spent the remaining steps are recorded as skipped.
One JSON summary (rewritten after every step, so an interrupted run keeps what it has): per step its status
(pass / fail / skip), seconds, key figures, the reason of a skip or failure and the log tail of a failure.
The exit code is 1 when any step failed, 0 otherwise. Nothing is installed or downloaded: tiny models built from
config, the offline tiny tokenizer, the vendored Qwen3 tokenizer, the bundled and synthetic data.

Steps (expected seconds on one H200; limit):
  env                   versions, GPU name and capability, optional packages                        5   (60)
  pytest_gpu            `pytest -m gpu` on the test files with GPU tests (Liger row kernel)         60  (180)
  flce_liger_bench      benchmarks/flce.py at (8192, 4096), against Liger's unweighted FLCE          45  (150)
  flash_varlen_packed   bf16 flash-attn varlen: packed rows equal the same samples unpacked          15  (90)
                        (skips when flash-attn is not installed)
  long_context          benchmarks/long_context.py --gpu (skips while the script is not built)       -   (180)
  thinkrec_world        rec prepare (synthetic) + train-cf MF + rec group on the GPU, stage 1 (2 steps) 40  (180)
  train_cf_sasrec_cuda  rec train-cf --model sasrec on CUDA                                          15  (90)
  thinkrec_ids_zero3    ThinkRec stage 2 (id prompts, frozen stage-1 adapter), ZeRO-3 bf16, 1 GPU    25  (150)
  thinkrec_ids_zero2    the same under ZeRO-2 bf16                                                  25  (150)
  thinkrec_stage3_soft  stage 3: MoLoRA with the entropy (soft) gate                                20  (120)
  rec_eval_cuda         rec eval of the stage-1 export: on the GPU in bf16                           15  (90)
  molecule_free         molecule captioning, think_mode=free (on-policy thoughts), bf16 autocast    25  (150)
  molecule_lora_zero3   molecule LoRA + graph encoder + projector trained together, ZeRO-3 bf16      25  (150)
  generate_cuda         `generate --device cuda` from a molecule checkpoint and from its export      35  (150)
  train_bf16_autocast   SFT full fine-tuning, fp32 weights under bf16 autocast                      15  (90)
  train_bf16_zero2      SFT full fine-tuning, DeepSpeed ZeRO-2 bf16                                  25  (120)
  train_fp16            SFT fp16 (GradScaler), 6 forced overflows: not NaN steps                     15  (90)
  train_fp16_zero2      the same under DeepSpeed ZeRO-2 fp16 (DeepSpeed's loss scaler)               25  (120)
  mfu                   benchmarks/train_step.py --mfu: Qwen3-1.7B shape, seq 4096, full FT + LoRA  100 (240)
  molora_bench          benchmarks/molora.py --quick on the GPU (merge speedup)                      30  (120)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable  # the python3 that runs this script (no venv on the GPU machine)
DEFAULT_BUDGET_S = 480
FAST = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "eval.every_steps=0",
        "data.eval=null", "checkpoint.resume=never"]
# an fp16 run whose steps 2-7 have finite losses and infinite gradients: six overflows in a row, one more than
# train.nan_max_consecutive. The loss scaler skips them; the trainer must not stop with exit 3.
FORCED_OVERFLOW_STEPS = "2,3,4,5,6,7"


class StepFailed(Exception):
    pass


class StepSkipped(Exception):
    pass


@dataclass
class Cmd:
    """One subprocess of a step. kind: `train` (python -m distthink.train --config C overrides), `cli` (python -m
    distthink ...), `script` (python PATH args; `flags` must appear in its --help), `pytest`, `internal` (a
    function of this file, run as `gpu_check.py --internal NAME`)."""

    kind: str
    args: list[str]
    config: str | None = None
    flags: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    ok_codes: tuple[int, ...] = (0,)

    def argv(self) -> list[str]:
        if self.kind == "train":
            return [PY, "-m", "distthink.train", *(["--config", self.config] if self.config else []), *self.args]
        if self.kind == "cli":
            return [PY, "-m", "distthink", *self.args]
        if self.kind == "script":
            return [PY, *self.args]
        if self.kind == "pytest":
            return [PY, "-m", "pytest", "-p", "no:cacheprovider", *self.args]
        if self.kind == "internal":
            return [PY, str(Path(__file__).resolve()), "--internal", *self.args]
        raise ValueError(self.kind)


@dataclass
class Step:
    name: str
    what: str
    expected_s: int
    limit_s: int
    cmds: Callable[["Ctx"], list[Cmd]]
    figures: Callable[["Ctx", list[str]], dict] = lambda ctx, outs: {}
    needs: tuple[str, ...] = ()
    skip_if: Callable[["Ctx"], str | None] = lambda ctx: None
    gpu_only: bool = False  # skipped by a CPU rehearsal (--device cpu)


@dataclass
class Ctx:
    work: Path
    logs: Path
    dry_run: bool = False
    device: str = "cuda"  # "cpu": a rehearsal of the steps that can run without a GPU
    status: dict = field(default_factory=dict)

    def w(self, *parts) -> Path:
        return self.work.joinpath(*parts)

    @property
    def dtype(self) -> str:
        """What `auto` resolves to on the device: the dtype generate and rec eval must report."""
        return "bfloat16" if self.device == "cuda" else "float32"


# ------------------------------------------------------------------------------------------------------------
# Output parsing
# ------------------------------------------------------------------------------------------------------------

def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise StepFailed("no JSON line in the output")


def run_summary(out_dir: Path) -> dict:
    """summary.json + metrics.jsonl of a training run: steps, final loss, finite losses, throughput, memory."""
    path = out_dir / "summary.json"
    if not path.is_file():
        raise StepFailed(f"{path} was not written")
    s = json.loads(path.read_text())
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows]
    finite = all(isinstance(x, float) and x == x and abs(x) != float("inf") for x in losses)
    if not rows or not finite:
        raise StepFailed(f"losses not finite: {losses}")
    return {"steps": s["steps"], "final_loss": round(s["final_loss"], 4), "tokens_per_s": s.get("tokens_per_s"),
            "peak_memory_mb": s.get("peak_memory_mb"), "zero_stage": s.get("zero_stage"),
            "first_loss": round(losses[0], 4)}


def grep(pattern: str, text: str) -> list[str]:
    return re.findall(pattern, text)


def model_line(text: str) -> dict:
    """distthink.models.load's line: the model's dtype and attention."""
    m = re.search(r"model: \w+, torch\.(\w+), attention=(\w+)", text)
    return {"param_dtype": m.group(1), "attention": m.group(2)} if m else {}


# ------------------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------------------

def _train(ctx: Ctx, config: str | None, out: Path, *extra: str, env: dict | None = None) -> Cmd:
    return Cmd("train", [*FAST, f"train.device={ctx.device}", f"train.output_dir={out}", *extra], config=config,
               env=env or {})


def _world_overrides(ctx: Ctx) -> list[str]:
    return [f"data.train={ctx.w('prep', 'train.parquet')}", "data.max_train_samples=32"]


def _ids(ctx: Ctx, stage: int) -> list[Cmd]:
    return [_train(ctx, "configs/thinkrec/smoke.yaml", ctx.w(f"ids_zero{stage}"), *_world_overrides(ctx),
                   "task.options.prompt_mode=ids", f"task.options.cf_export={ctx.w('cf')}",
                   f"task.options.init_adapter={ctx.w('stage1', 'export')}", "task.options.freeze_lora=true",
                   f"distributed.deepspeed=ds_configs/zero{stage}.json", "train.max_steps=3",
                   "checkpoint.export=none")]


def _summary_of(name: str) -> Callable[[Ctx, list[str]], dict]:
    def figures(ctx: Ctx, outs: list[str]) -> dict:
        return {**run_summary(ctx.w(name)), **model_line(outs[-1])}
    return figures


def _fp16_figures(name: str) -> Callable[[Ctx, list[str]], dict]:
    def figures(ctx: Ctx, outs: list[str]) -> dict:
        f = {**run_summary(ctx.w(name)), **model_line(outs[-1])}
        f["overflow_steps"] = len(grep(r"fp16 loss-scale overflow", outs[-1]))
        f["nan_steps"] = len(grep(r"non-finite loss=", outs[-1]))
        if f["overflow_steps"] < len(FORCED_OVERFLOW_STEPS.split(",")) or f["nan_steps"]:
            raise StepFailed(f"expected {FORCED_OVERFLOW_STEPS} as loss-scale overflows and no NaN step: {f}")
        return f
    return figures


def _world_figures(ctx: Ctx, outs: list[str]) -> dict:
    prep, cf, group = last_json(outs[0]), last_json(outs[1]), last_json(outs[2])
    return {"rows": {k: prep.get(k) for k in ("train", "valid", "test")}, "cf_valid_auc": cf.get("valid_auc"),
            "cf_device": (grep(r"train-cf mf on (\w+)", outs[1]) or [None])[0], "n_groups": group.get("n_groups"),
            "stage1": run_summary(ctx.w("stage1"))}


def _sasrec_figures(ctx: Ctx, outs: list[str]) -> dict:
    f = last_json(outs[0])
    device = (grep(r"train-cf sasrec on (\S+):", outs[0]) or [None])[0]
    if not device or not device.startswith(ctx.device):
        raise StepFailed(f"train-cf ran on {device}, not on {ctx.device}")
    return {"valid_auc": f.get("valid_auc"), "test_auc": f.get("test_auc"), "device": device}


def _rec_eval_figures(ctx: Ctx, outs: list[str]) -> dict:
    placed = grep(r"rec eval: \d+ rows \(rank 0 of 1\) on (\S+) in (\w+), attention=(\w+)", outs[0])
    if not placed or not placed[0][0].startswith(ctx.device) or placed[0][1] != ctx.dtype:
        raise StepFailed(f"rec eval placement {placed}: expected {ctx.device} in {ctx.dtype}")
    m = last_json(outs[0])["llm"]
    return {"device": placed[0][0], "dtype": placed[0][1], "attention": placed[0][2], "auc": m.get("auc"),
            "uauc": m.get("uauc")}


def _generate_figures(ctx: Ctx, outs: list[str]) -> dict:
    f = {"train": run_summary(ctx.w("gen_run"))}
    for label, out, path in (("from_checkpoint", outs[1], ctx.w("gen_ckpt.jsonl")),
                             ("from_export", outs[2], ctx.w("gen_export.jsonl"))):
        placed = grep(r"generator: \S+ on (\S+) in (\w+), attention=(\w+)", out)
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        if not placed or not placed[0][0].startswith(ctx.device) or placed[0][1] != ctx.dtype or len(recs) != 4:
            raise StepFailed(f"generate {label}: placement {placed}, {len(recs)} records (expected {ctx.device}, "
                             f"{ctx.dtype}, 4)")
        f[label] = {"device": placed[0][0], "dtype": placed[0][1], "attention": placed[0][2], "records": len(recs),
                    "mean_new_tokens": sum(r["num_new_tokens"] for r in recs) / len(recs)}
    return f


def _free_figures(ctx: Ctx, outs: list[str]) -> dict:
    f = {**run_summary(ctx.w("molecule_free")), **model_line(outs[0])}
    regen = grep(r"free mode step \d+: regenerated (\d+) thoughts", outs[0])
    if not regen:
        raise StepFailed("no free-mode generation was logged")
    f["thoughts_regenerated"] = sum(int(x) for x in regen)
    return f


def _env_figures(ctx: Ctx, outs: list[str]) -> dict:
    env = last_json(outs[0])
    if ctx.device == "cuda" and not env["cuda_available"]:
        raise StepFailed("no CUDA device visible (a CPU rehearsal is --device cpu)")
    return env


def _pytest_figures(ctx: Ctx, outs: list[str]) -> dict:
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", outs[0])}
    if not counts.get("passed"):
        raise StepFailed(f"no GPU test ran: {counts} (liger-kernel / triton missing?)")
    return counts


def _flce_figures(ctx: Ctx, outs: list[str]) -> dict:
    j = last_json(outs[0])
    keys = ("device", "N", "H", "dtype", "time_ratio_vs_liger_unweighted", "mem_ratio_vs_liger_unweighted",
            "time_ratio_vs_naive", "mem_ratio_vs_naive", "time_ratio_vs_matmul_bound")
    return {k: j.get(k) for k in keys}


def _mfu_figures(ctx: Ctx, outs: list[str]) -> dict:
    j = last_json(outs[0])
    variants = {v["name"]: {k: v.get(k) for k in ("mfu", "tokens_per_s", "peak_memory_mb", "attention",
                                                  "plan_vs_measured_memory", "gpu_spec", "error")}
                for v in j.get("variants", [])}
    if not variants or any(v.get("error") or v.get("mfu") is None for v in variants.values()):
        raise StepFailed(f"MFU not measured: {variants or j}")
    return variants


def _molora_figures(ctx: Ctx, outs: list[str]) -> dict:
    j = last_json(outs[0])
    return {k: v for k, v in j.items() if not isinstance(v, (list, dict))}


def _no_flash(ctx: Ctx) -> str | None:
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed: the bf16 varlen packed-vs-unpacked check needs it (pip install flash-attn)"
    return None


def _no_long_context(ctx: Ctx) -> str | None:
    if not (ROOT / "benchmarks" / "long_context.py").is_file():
        return "benchmarks/long_context.py not built yet (issue #17)"
    return None


def _gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


STEPS: list[Step] = [
    Step("env", "versions, GPU name and capability, optional packages", 5, 60,
         lambda ctx: [Cmd("internal", ["env"])], _env_figures),
    Step("pytest_gpu", "pytest -m gpu on the test files with GPU tests", 60, 180,
         lambda ctx: [Cmd("pytest", ["-m", "gpu", "-q", "-rs", *_gpu_test_files()])], _pytest_figures, gpu_only=True),
    Step("flce_liger_bench", "benchmarks/flce.py at (8192, 4096) bf16 against Liger", 45, 150,
         lambda ctx: [Cmd("script", ["benchmarks/flce.py", "--quick", "--shape", "8192,4096", "--device", "cuda"],
                          flags=("--quick", "--shape", "--device"))], _flce_figures, gpu_only=True),
    Step("flash_varlen_packed", "bf16 flash-attn varlen: packed rows equal unpacked", 15, 90,
         lambda ctx: [Cmd("internal", ["flash_varlen"])], lambda ctx, outs: last_json(outs[0]), skip_if=_no_flash,
         gpu_only=True),
    Step("long_context", "benchmarks/long_context.py --gpu", 120, 180,
         lambda ctx: [Cmd("script", ["benchmarks/long_context.py", "--gpu"], flags=("--gpu",))],
         lambda ctx, outs: last_json(outs[0]), skip_if=_no_long_context, gpu_only=True),
    Step("thinkrec_world", "rec prepare + train-cf MF + rec group, stage 1 (2 steps, LoRA export)", 40, 180,
         lambda ctx: [
             Cmd("cli", ["rec", "prepare", "--input", "synthetic", "--out", str(ctx.w("prep")),
                         "--reasons", "template"]),
             Cmd("cli", ["rec", "train-cf", "--data", str(ctx.w("prep")), "--model", "mf", "--out", str(ctx.w("cf")),
                         "--epochs", "3", "--no-progress"]),
             Cmd("cli", ["rec", "group", "--cf", str(ctx.w("cf")), "--out", str(ctx.w("groups")), "--n-groups", "2",
                         "--no-plots"]),
             _train(ctx, "configs/thinkrec/smoke.yaml", ctx.w("stage1"), *_world_overrides(ctx), "train.max_steps=2",
                    "checkpoint.export=adapter")], _world_figures),
    Step("train_cf_sasrec_cuda", "rec train-cf --model sasrec on CUDA", 15, 90,
         lambda ctx: [Cmd("cli", ["rec", "train-cf", "--data", str(ctx.w("prep")), "--model", "sasrec", "--out",
                                  str(ctx.w("cf_sasrec")), "--epochs", "2", "--no-progress"])],
         _sasrec_figures, needs=("thinkrec_world",)),
    Step("thinkrec_ids_zero3", "ThinkRec stage 2 (id prompts), ZeRO-3 bf16 on 1 GPU", 25, 150,
         lambda ctx: _ids(ctx, 3), _summary_of("ids_zero3"), needs=("thinkrec_world",)),
    Step("thinkrec_ids_zero2", "ThinkRec stage 2 (id prompts), ZeRO-2 bf16 on 1 GPU", 25, 150,
         lambda ctx: _ids(ctx, 2), _summary_of("ids_zero2"), needs=("thinkrec_world",)),
    Step("thinkrec_stage3_soft", "ThinkRec stage 3: MoLoRA with the entropy (soft) gate", 20, 120,
         lambda ctx: [_train(ctx, "configs/thinkrec/stage3_smoke.yaml", ctx.w("stage3_soft"), *_world_overrides(ctx),
                             f"task.options.molora.groups_dir={ctx.w('groups')}",
                             f"task.options.molora.init_adapter={ctx.w('stage1', 'export')}",
                             "task.options.molora.gate=soft", f"task.options.cf_export={ctx.w('cf')}",
                             "train.max_steps=3", "checkpoint.export=none")],
         _summary_of("stage3_soft"), needs=("thinkrec_world",)),
    Step("rec_eval_cuda", "rec eval of the stage-1 export on the GPU in bf16", 15, 90,
         lambda ctx: [Cmd("cli", ["rec", "eval", "--config", "configs/thinkrec/smoke.yaml", "--export",
                                  str(ctx.w("stage1", "export")), "--split", str(ctx.w("prep", "test.parquet")),
                                  "--limit", "64", f"data.train={ctx.w('prep', 'train.parquet')}"])],
         _rec_eval_figures, needs=("thinkrec_world",)),
    Step("molecule_free", "molecule captioning, think_mode=free, bf16 autocast", 25, 150,
         lambda ctx: [_train(ctx, "configs/molecule/cpu_smoke.yaml", ctx.w("molecule_free"),
                             "task.options.think_mode=free",
                             "task.options.max_think_tokens=16", "data.max_train_samples=16", "train.max_steps=2",
                             "checkpoint.export=none")], _free_figures),
    Step("molecule_lora_zero3", "molecule LoRA + graph encoder + projector, ZeRO-3 bf16", 25, 150,
         lambda ctx: [_train(ctx, "configs/molecule/cpu_smoke.yaml", ctx.w("molecule_lora_zero3"), "lora.enabled=true",
                             "distributed.deepspeed=ds_configs/zero3.json", "data.max_train_samples=16",
                             "train.max_steps=3", "checkpoint.export=none")], _summary_of("molecule_lora_zero3")),
    Step("generate_cuda", "generate --device cuda from a molecule checkpoint and from its export", 35, 150,
         lambda ctx: [
             _train(ctx, "configs/molecule/cpu_smoke.yaml", ctx.w("gen_run"), "data.max_train_samples=16",
                    "train.max_steps=2", "checkpoint.export=full"),
             Cmd("cli", ["generate", str(ctx.w("gen_run", "checkpoints", "step-00000002")), "--input", "demo",
                         "--limit", "4", "--device", ctx.device, "--max-new-tokens", "16", "--no-progress",
                         "--out", str(ctx.w("gen_ckpt.jsonl"))]),
             Cmd("cli", ["generate", str(ctx.w("gen_run", "export")), "--input", "demo", "--limit", "4",
                         "--device", ctx.device, "--max-new-tokens", "16", "--no-progress",
                         "--out", str(ctx.w("gen_export.jsonl"))])], _generate_figures),
    Step("train_bf16_autocast", "SFT full fine-tuning, fp32 weights under bf16 autocast", 15, 90,
         lambda ctx: [_train(ctx, None, ctx.w("bf16_autocast"), "lora.enabled=false", "train.max_steps=6",
                             "checkpoint.export=none")], _summary_of("bf16_autocast")),
    Step("train_bf16_zero2", "SFT full fine-tuning, DeepSpeed ZeRO-2 bf16", 25, 120,
         lambda ctx: [_train(ctx, None, ctx.w("bf16_zero2"), "lora.enabled=false", "train.max_steps=6",
                             "distributed.deepspeed=ds_configs/zero2.json", "checkpoint.export=none")],
         _summary_of("bf16_zero2")),
    Step("train_fp16", "SFT fp16 with GradScaler; forced overflows are not NaN steps", 15, 90,
         lambda ctx: [_train(ctx, None, ctx.w("fp16"), "lora.enabled=false", "model.dtype=float16",
                             "train.max_steps=10",
                             "checkpoint.export=none", env={"DISTTHINK_FAULT_INF_GRAD_STEPS": FORCED_OVERFLOW_STEPS})],
         _fp16_figures("fp16"), gpu_only=True),
    Step("train_fp16_zero2", "SFT fp16 under DeepSpeed ZeRO-2 (its loss scaler)", 25, 120,
         lambda ctx: [_train(ctx, None, ctx.w("fp16_zero2"), "lora.enabled=false", "model.dtype=float16",
                             "train.max_steps=10", "distributed.deepspeed=ds_configs/zero2.json",
                             "checkpoint.export=none", env={"DISTTHINK_FAULT_INF_GRAD_STEPS": FORCED_OVERFLOW_STEPS})],
         _fp16_figures("fp16_zero2"), gpu_only=True),
    Step("mfu", "benchmarks/train_step.py --mfu: Qwen3-1.7B shape, seq 4096, full FT and LoRA", 100, 240,
         lambda ctx: [Cmd("script", ["benchmarks/train_step.py", "--mfu", "--steps", "10", "--warmup", "4"],
                          flags=("--mfu", "--steps", "--warmup"))], _mfu_figures, gpu_only=True),
    Step("molora_bench", "benchmarks/molora.py --quick on the GPU", 30, 120,
         lambda ctx: [Cmd("script", ["benchmarks/molora.py", "--quick", "--device", ctx.device],
                          flags=("--quick", "--device"))], _molora_figures),
]


# ------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------

def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    path = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env.update(PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_cmd(cmd: Cmd, log: Path, timeout_s: float) -> str:
    """Run one command (its own process group, killed whole at the time limit); returns its stdout+stderr."""
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd.argv())}\n")
        fh.flush()
        start = fh.tell()
        proc = subprocess.Popen(cmd.argv(), cwd=ROOT, env=child_env(cmd.env), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its children (torchrun, DeepSpeed workers)
            proc.wait()
            raise StepFailed(f"time limit: killed after {timeout_s:.0f} s") from None
    with open(log) as fh:
        fh.seek(start)
        out = fh.read()
    if code not in cmd.ok_codes:
        raise StepFailed(f"exit {code}: {' '.join(cmd.argv()[1:4])} ...")
    return out


def check_cmd(cmd: Cmd, log: Path) -> str:
    """Dry run: the command would start. Configs load and validate, the task imports, CLI arguments parse, scripts
    accept their flags, pytest collects, internal functions import what they use."""
    if cmd.kind == "train":
        from distthink.config import load_config
        from distthink.engine.task import task_class

        cfg = load_config(cmd.config, cmd.args)
        task_class(cfg.task.name)
        return f"config ok: {cmd.config or '<embedded default>'} task={cfg.task.name}"
    if cmd.kind == "cli":
        from distthink.cli import build_parser

        try:
            args = build_parser().parse_args(cmd.args)
        except SystemExit as err:
            raise StepFailed(f"distthink {' '.join(cmd.args[:2])}: arguments rejected ({err.code})") from None
        if cmd.args[:2] == ["rec", "eval"]:
            from distthink.config import load_config

            load_config(args.config, args.overrides)
        return f"arguments ok: distthink {' '.join(a for a in cmd.args[:2] if not a.startswith(('/', '.')))}"
    if cmd.kind == "script":
        script = ROOT / cmd.args[0]
        if not script.is_file():
            raise StepFailed(f"{cmd.args[0]} does not exist")
        out = run_cmd(Cmd("script", [cmd.args[0], "--help"]), log, 120)
        missing = [f for f in cmd.flags if f not in out]
        if missing:
            raise StepFailed(f"{cmd.args[0]} has no flag {missing}")
        return f"flags ok: {cmd.args[0]} {' '.join(cmd.flags)}"
    if cmd.kind == "pytest":
        files = [a for a in cmd.args if a.endswith(".py")]
        if not files:
            raise StepFailed("no test file has GPU tests (pytest.mark.gpu)")
        out = run_cmd(Cmd("pytest", ["--collect-only", "-q", "-m", "gpu", *files]), log, 120)
        if not re.search(r"(\d+)/\d+ tests collected|(\d+) tests? collected", out):
            raise StepFailed("pytest collected nothing")
        return "collected: " + out.strip().splitlines()[-1]
    if cmd.kind == "internal":
        fn = INTERNAL.get(cmd.args[0])
        if fn is None:
            raise StepFailed(f"no internal function {cmd.args[0]}")
        for module in INTERNAL_IMPORTS.get(cmd.args[0], ()):
            importlib.import_module(module)
        return f"internal ok: {cmd.args[0]}"
    raise StepFailed(f"unknown command kind {cmd.kind}")


def run_step(step: Step, ctx: Ctx, limit_s: float) -> dict:
    log = ctx.logs / f"{step.name}.log"
    log.write_text("")
    t0 = time.monotonic()
    rec = {"name": step.name, "what": step.what, "expected_s": step.expected_s, "limit_s": step.limit_s}
    try:
        reason = step.skip_if(ctx)
        if reason:
            raise StepSkipped(reason)
        if step.gpu_only and ctx.device != "cuda" and not ctx.dry_run:
            raise StepSkipped("needs a GPU (this is a CPU rehearsal)")
        if not ctx.dry_run:
            failed = [n for n in step.needs if ctx.status.get(n) != "pass"]
            if failed:
                raise StepSkipped(f"needs {', '.join(failed)}, which did not pass")
        outs = []
        for cmd in step.cmds(ctx):
            if ctx.dry_run:
                outs.append(check_cmd(cmd, log))
                continue
            left = limit_s - (time.monotonic() - t0)
            if left <= 0:
                raise StepFailed(f"time limit: {limit_s:.0f} s spent before the step's last command")
            try:
                outs.append(run_cmd(cmd, log, left))
            except StepFailed as err:
                cut = " (the run's --budget-s left less than the step's limit)" if limit_s < step.limit_s else ""
                raise StepFailed(f"{err}{cut}") from None
        rec.update(status="pass", figures={"checked": outs} if ctx.dry_run else step.figures(ctx, outs))
    except StepSkipped as err:
        rec.update(status="skip", reason=str(err))
    except Exception as err:  # a step's failure (ours or a parse error) is its own, never the run's
        rec.update(status="fail", reason=f"{type(err).__name__}: {err}" if not isinstance(err, StepFailed)
                   else str(err))
        rec["log_tail"] = log.read_text()[-4000:] if log.is_file() else ""
    rec["seconds"] = round(time.monotonic() - t0, 1)
    ctx.status[step.name] = rec["status"]
    return rec


def run_steps(steps: list[Step], ctx: Ctx, out: Path, budget_s: float) -> dict:
    t0 = time.monotonic()
    summary = {"gpu_check": 1, "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "dry_run": ctx.dry_run, "device": ctx.device, "budget_s": budget_s, "workdir": str(ctx.work),
               "logs": str(ctx.logs),
               "steps": []}
    for step in steps:
        left = budget_s - (time.monotonic() - t0)
        if left <= 0:
            rec = {"name": step.name, "what": step.what, "status": "skip", "reason": "skipped: budget",
                   "seconds": 0.0, "expected_s": step.expected_s, "limit_s": step.limit_s}
            ctx.status[step.name] = "skip"
        else:
            rec = run_step(step, ctx, min(step.limit_s, left))
        summary["steps"].append(rec)
        print(f"gpu_check: {rec['name']:<22} {rec['status']:<5} {rec['seconds']:>6.1f} s"
              + (f"  ({rec['reason']})" if rec.get("reason") else ""), flush=True)
        _finish(summary, t0, out)
    return summary


def _finish(summary: dict, t0: float, out: Path) -> None:
    summary["total_s"] = round(time.monotonic() - t0, 1)
    for s in ("pass", "fail", "skip"):
        summary[{"pass": "passed", "fail": "failed", "skip": "skipped"}[s]] = sum(
            1 for r in summary["steps"] if r["status"] == s)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out)


# ------------------------------------------------------------------------------------------------------------
# Internal steps (run as `gpu_check.py --internal NAME` subprocesses)
# ------------------------------------------------------------------------------------------------------------

def internal_env() -> dict:
    import torch

    from distthink.launch.hardware import gpu_for_device_name

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    gpu = gpu_for_device_name(name) if name else None
    versions = {}
    for pkg in ("transformers", "accelerate", "peft", "deepspeed", "liger_kernel", "triton", "flash_attn",
                "torch_geometric", "rdkit", "datasets", "pandas", "pyarrow"):
        try:
            versions[pkg] = getattr(importlib.import_module(pkg), "__version__", "present")
        except Exception as err:  # an optional package that fails to import is a fact to report, not a failure
            versions[pkg] = f"missing ({type(err).__name__})"
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": cuda, "device": name,
           "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
           "gpu_spec": gpu.name if gpu else None, "bf16_peak_flops": gpu.bf16_flops if gpu else None,
           "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
           "packages": versions}
    print(json.dumps(out))
    return 0


def internal_flash_varlen() -> int:
    """bf16 flash-attn varlen: three samples packed in one row give each sample's logits unpacked (the packing
    contract: position ids restart, cu_seq_lens keep attention inside each sample)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distthink.data.packing import collate_packed
    from distthink.data.types import EncodedSample
    from distthink.models.attention import model_inputs
    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(), attn_implementation="flash_attention_2",
                                             dtype=torch.bfloat16).cuda().eval()
    lengths = (37, 64, 21)
    samples = [EncodedSample(input_ids=torch.randint(5, 200, (n,)).tolist(), labels=[-100] * n,
                             loss_weights=[0.0] * n, meta={}) for n in lengths]
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in collate_packed(samples).items()}
    with torch.no_grad():
        packed = model(**model_inputs(batch, "flash_attention_2")).logits[0].float()
        worst, ref_max, start = 0.0, 0.0, 0
        for s, n in zip(samples, lengths):
            alone = model(input_ids=torch.tensor([s.input_ids], device="cuda")).logits[0].float()
            worst = max(worst, float((packed[start:start + n] - alone).abs().max()))
            ref_max = max(ref_max, float(alone.abs().max()))
            start += n
    # bf16 arithmetic in other block orders: a few bf16 ulps of the largest logit
    tol = 8 * torch.finfo(torch.bfloat16).eps * max(ref_max, 1.0)
    print(json.dumps({"max_abs_diff": worst, "tolerance": tol, "max_logit": ref_max, "lengths": lengths}))
    return 0 if worst <= tol else 1


INTERNAL = {"env": internal_env, "flash_varlen": internal_flash_varlen}
INTERNAL_IMPORTS = {"env": ("torch", "distthink.launch.hardware"),
                    "flash_varlen": ("torch", "transformers", "distthink.data.packing", "distthink.models.tiny")}


# ------------------------------------------------------------------------------------------------------------

def select(only: str | None, skip: str | None) -> list[Step]:
    names = [s.name for s in STEPS]
    chosen = [n.strip() for n in only.split(",")] if only else names
    dropped = {n.strip() for n in skip.split(",")} if skip else set()
    unknown = [n for n in [*chosen, *dropped] if n not in names]
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {unknown}; steps: {', '.join(names)}")
    return [s for s in STEPS if s.name in chosen and s.name not in dropped]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="gpu_check.json", help="the JSON summary (default gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"total seconds; steps that would start later are skipped (default {DEFAULT_BUDGET_S})")
    ap.add_argument("--workdir", default=None, help="runs and logs go here (default: a new temporary folder)")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    ap.add_argument("--skip", default=None, help="comma-separated step names not to run")
    ap.add_argument("--dry-run", action="store_true", help="CPU: check that every step starts, run nothing")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: rehearse on a CPU machine the steps that can run there (slow; for the script itself)")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--internal", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.internal:
        return INTERNAL[args.internal]()
    steps = select(args.only, args.skip)
    if args.list:
        for s in steps:
            print(f"{s.name:<22} expected {s.expected_s:>4} s  limit {s.limit_s:>4} s  {s.what}")
        print(f"{'total':<22} expected {sum(s.expected_s for s in steps):>4} s")
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(work=work.resolve(), logs=(work / "logs").resolve(), dry_run=args.dry_run, device=args.device)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.update({k: v for k, v in child_env().items() if k == "PYTHONPATH"})
    print(f"gpu_check: {len(steps)} steps, budget {args.budget_s:.0f} s, work in {ctx.work}"
          + (" (dry run)" if args.dry_run else ""), flush=True)
    summary = run_steps(steps, ctx, Path(args.out), args.budget_s)
    print(f"gpu_check: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped in "
          f"{summary['total_s']} s; summary in {args.out}", flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
