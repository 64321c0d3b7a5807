"""Benchmark: training throughput and peak memory of the real recipe (distthink.train).

    python benchmarks/train_step.py --quick      # CPU, < 1 min on 2 cores: tiny default, 1 + 2 ranks
    python benchmarks/train_step.py              # CPU: every variant, more steps
    python benchmarks/train_step.py --mfu        # GPU: Qwen3-1.7B-shaped model, sequence 4096, full FT and LoRA

Each variant runs the recipe itself (distthink.train.run; the 1-rank variants one after the other in
one process, each 2-rank variant under torchrun) with checkpoints/eval/export off, and reads the run's summary.json: tokens/s counts real (non-pad) tokens of
all ranks over the timed steps (the first `--warmup` steps are excluded), learned tokens/s counts the
tokens with a target, peak memory is per rank (CUDA allocator peak on GPU, max RSS on CPU).

Variants (tiny default model, full fine-tuning, 1 and 2 ranks): packed vs padded rows
(batch.packing), fused linear cross-entropy vs logits + cross-entropy (loss.impl).

MFU (`--mfu`, needs a CUDA GPU): a Qwen3-1.7B-shaped model built from config (random init, bf16,
flash-attn when installed), the vendored Qwen3 tokenizer and synthetic ~4k-token samples, one GPU.
MFU = tokens/s x model FLOPs per token (distthink.launch.plan.model_flops_per_token, no recomputation counted)
/ the GPU's dense bf16 peak (distthink.launch.plan.GPUS). On a machine without CUDA the MFU fields are null.
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN3_TOKENIZER = ROOT / "tests" / "fixtures" / "qwen3"
QWEN3_1_7B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2048,
                  intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, torch_dtype="bfloat16")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIXED = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "eval.every_steps=0",
         "data.eval=null", "checkpoint.every_steps=0", "checkpoint.export=none", "checkpoint.resume=never",
         "checkpoint.final=false"]


def run_variants(variants: list[tuple[str, list[str]]], nproc: int, workdir: Path, timeout: float) -> list[dict]:
    """Launch one process group that runs `variants` one after the other (import cost paid once).

    Several variants share a launch only with nproc == 1 (a process group cannot be re-created
    in-process after the recipe's teardown)."""
    assert nproc == 1 or len(variants) == 1
    spec = [[name, FIXED + [f"train.output_dir={workdir / name}", *ov]] for name, ov in variants]
    spec_file = workdir / f"spec-{variants[0][0]}.json"
    spec_file.write_text(json.dumps(spec))
    me = str(Path(__file__).resolve())
    if nproc == 1:
        cmd = [sys.executable, me, "--worker", str(spec_file)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
               "--master_addr=127.0.0.1", me, "--worker", str(spec_file)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR=os.environ.get(
        "DS_ACCELERATOR", "cpu" if not _cuda() else "cuda"), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = round(time.time() - t0, 1)
    results = []
    for name, _ in variants:
        out = workdir / name
        if not (out / "summary.json").exists():
            results.append({"name": name, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"})
            continue
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
        results.append({"name": name, "ranks": nproc, "summary": summary, "rows": rows, "launch_s": wall})
    return results


def worker(spec_file: str) -> None:
    from distthink.config import load_config
    from distthink.train import run

    for _name, overrides in json.loads(Path(spec_file).read_text()):
        code = run(load_config(None, overrides))
        if code != 0:
            sys.exit(code)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def timed_figures(res: dict, warmup: int) -> dict:
    """Throughput over the steps after warm-up, from the per-step records (time_s is cumulative)."""
    if "error" in res:
        return {"name": res["name"], "error": res["error"]}
    rows = res["rows"]
    timed = rows[warmup:] if len(rows) > warmup + 1 else rows
    # per-step durations: learned_tokens / learned_tokens_per_s (exact per-step wall time of the step)
    dur = sum(r["learned_tokens"] / r["learned_tokens_per_s"] for r in timed if r["learned_tokens_per_s"] > 0)
    tokens = sum(r["tokens"] for r in timed)
    learned = sum(r["learned_tokens"] for r in timed)
    return {"name": res["name"], "ranks": res["ranks"], "steps_timed": len(timed),
            "tokens_per_s": round(tokens / dur, 1) if dur else None,
            "learned_tokens_per_s": round(learned / dur, 1) if dur else None,
            "peak_memory_mb": round(res["summary"]["peak_memory_mb"], 1),
            "final_loss": round(rows[-1]["loss"], 4), "launch_s": res["launch_s"]}


def cpu_variants(quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, overrides, ranks)."""
    base = ["lora.enabled=false"]
    packed_fused = ("1rank_packed_fused", base + ["batch.packing=true", "loss.impl=fused"], 1)
    variants = [packed_fused,
                ("1rank_packed_hf", base + ["batch.packing=true", "loss.impl=hf"], 1),
                ("1rank_padded_fused", base + ["batch.packing=false", "loss.impl=fused"], 1),
                ("2rank_packed_fused", base + ["batch.packing=true", "loss.impl=fused"], 2)]
    if not quick:
        variants += [("1rank_padded_hf", base + ["batch.packing=false", "loss.impl=hf"], 1),
                     ("2rank_packed_hf", base + ["batch.packing=true", "loss.impl=hf"], 2),
                     ("2rank_padded_fused", base + ["batch.packing=false", "loss.impl=fused"], 2),
                     ("2rank_packed_fused_zero3", base + ["batch.packing=true", "loss.impl=fused",
                                                          "distributed.deepspeed=ds_configs/zero3.json"], 2)]
    return variants


def write_long_samples(path: Path, n: int, target_tokens: int) -> None:
    """Synthetic reasoning samples of about `target_tokens` Qwen3 tokens each (for the MFU runs)."""
    words = "the model reasons step by step about numbers words and letters before it answers".split()
    with open(path, "w") as fh:
        for i in range(n):
            body = " ".join(words[(i + j) % len(words)] for j in range(int(target_tokens * 0.45)))
            rec = {"messages": [{"role": "user", "content": f"Question {i}: {body[:200]}"},
                                {"role": "assistant", "content": f"Answer {i}.", "reasoning_content": body}]}
            fh.write(json.dumps(rec) + "\n")


def mfu_variants(workdir: Path, seq: int, steps: int = 30) -> list[tuple[str, list[str], int]]:
    cfg_dir = workdir / "qwen3-1.7b-shape"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(QWEN3_1_7B))
    data = workdir / "long.jsonl"
    write_long_samples(data, 64, seq - 200)
    base = [f"model.from_config={cfg_dir}", f"model.tokenizer={QWEN3_TOKENIZER}", f"data.train={data}",
            f"data.max_length={seq}", f"batch.max_tokens={seq}", f"train.max_steps={steps}", "train.warmup_steps=2",
            "model.gradient_checkpointing=true", "train.device=cuda"]
    return [("mfu_full_ft_qwen3_1.7b_seq%d" % seq, base + ["lora.enabled=false"], 1),
            ("mfu_lora_qwen3_1.7b_seq%d" % seq, base + ["lora.enabled=true"], 1)]


def mfu_of(fig: dict, overrides: list[str], seq: int) -> dict:
    import torch

    from distthink.config import load_config, resolve_attention, resolve_dtype
    from distthink.launch.hardware import GPUS, gpu_for_device_name
    from distthink.launch.plan import estimate, model_flops_per_token, model_shape_from_config, run_shape_from_config

    cfg = load_config(None, overrides)
    # what the run really used (flash-attn only where installed): the plan below models the same attention
    cfg.model.attn_implementation = resolve_attention(cfg.model.attn_implementation, "cuda", resolve_dtype(cfg, "cuda"))
    shape = model_shape_from_config(cfg)
    run = run_shape_from_config(cfg, device="cuda", seq_len=seq)
    fpt = model_flops_per_token(shape, run, recompute=False)
    name = torch.cuda.get_device_name(0)
    gpu = gpu_for_device_name(name)
    peak = gpu.bf16_flops if gpu else None
    planned = estimate(shape, run, nodes=1, gpus_per_node=1, gpu=gpu or GPUS["h100"], candidate="ddp")
    measured_mb = fig.get("peak_memory_mb")
    return {"flops_per_token": fpt, "gpu": name, "gpu_spec": gpu.name if gpu else None, "peak_bf16_flops": peak,
            "attention": cfg.model.attn_implementation,
            "mfu": round(fig["tokens_per_s"] * fpt / peak, 4) if peak and fig.get("tokens_per_s") else None,
            # distthink plan's allocated-bytes estimate vs torch.cuda.max_memory_allocated of the run
            "plan_allocated_mb": round(planned.allocated_bytes / 2**20, 1),
            "plan_vs_measured_memory": round(planned.allocated_bytes / 2**20 / measured_mb, 3) if measured_mb else None,
            **({} if gpu else {"mfu_note": f"unknown GPU name {name!r}: no peak in distthink.launch.hardware"})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="< 1 min on 2 CPU cores")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="first steps excluded from the figures")
    ap.add_argument("--mfu", action="store_true", help="GPU only: Qwen3-1.7B-shaped full FT and LoRA MFU")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length of the MFU runs")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    steps = args.steps or (8 if args.quick else 40)
    results, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="distthink-bench-") as tmp:
        work = Path(tmp)
        if args.mfu:
            if not _cuda():
                extra["mfu_note"] = "no CUDA device: MFU not measured (run `--mfu` on a GPU machine)"
            else:
                for name, ov, n in mfu_variants(work, args.seq, args.steps or 30):
                    fig = timed_figures(run_variants([(name, ov)], n, work, timeout=3600)[0], args.warmup)
                    if "error" not in fig:
                        fig.update(mfu_of(fig, ov, args.seq))
                    results.append(fig)
        else:
            variants = cpu_variants(args.quick)
            singles = [(name, ov + [f"train.max_steps={steps}"]) for name, ov, n in variants if n == 1]
            for res in run_variants(singles, 1, work, timeout=900):
                results.append(timed_figures(res, args.warmup))
            for name, ov, n in variants:
                if n > 1:
                    res = run_variants([(name, ov + [f"train.max_steps={steps}"])], n, work, timeout=600)[0]
                    results.append(timed_figures(res, args.warmup))
    by = {r["name"]: r for r in results}

    def ratio(a, b, key="tokens_per_s"):
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    for r in results:
        print(json.dumps(r))
    out = {"benchmark": "train_step", "quick": args.quick, "device": "cuda" if _cuda() else "cpu",
           "steps": steps, "variants": results,
           "ratio_packed_vs_padded_tokens_per_s": ratio("1rank_packed_fused", "1rank_padded_fused"),
           "ratio_fused_vs_hf_tokens_per_s": ratio("1rank_packed_fused", "1rank_packed_hf"),
           "ratio_2rank_vs_1rank_tokens_per_s": ratio("2rank_packed_fused", "1rank_packed_fused"),
           "ratio_fused_vs_hf_peak_memory": ratio("1rank_packed_fused", "1rank_packed_hf", "peak_memory_mb"),
           "mfu": None if not args.mfu else {r["name"]: r.get("mfu") for r in results}, **extra}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
