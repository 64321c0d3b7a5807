"""Benchmark: long rows with Ulysses sequence parallelism (distributed.sequence_parallel) and tiled MLPs.

    python benchmarks/long_context.py --quick     # CPU, 2 gloo ranks: ~4 min on 2 busy cores
    python benchmarks/long_context.py             # CPU, a wider model and more steps
    python benchmarks/long_context.py --gpu       # one CUDA GPU, SP 1: Qwen3-1.7B-shaped rows of 32k and 64k tokens
    python benchmarks/long_context.py --gpu --dry-run   # the GPU mode's code on CPU, tiny: does it start?

CPU (two measurements, each once at SP 1 in one process and once at SP 2 on two gloo processes, with the
attention all-to-alls of DeepSpeed's UlyssesSPAttentionHF around distthink's packed core, as the trainer runs it):

- step time: forward + backward of the LM-head loss part (distthink.engine.lm_loss.LMHeadLoss, fused loss) on
  one row of `--time-tokens` tokens, median of `--steps` after one warm-up; `sp2_over_sp1` is the ratio (0.5 would
  be perfect scaling on 2 ranks; each rank has one thread).
- longest row under a memory cap: bisection (granularity 256 tokens) on the row length for which the peak of live
  tensor bytes of a rank (benchmarks/plan_validation.py's tracker, the CPU analogue of
  torch.cuda.max_memory_allocated: parameters, gradients, saved activations, loss buffers; no optimizer) stays
  under `--cap-mib`, without and with `model.tiled_mlp` tiles; gradient checkpointing on, as long rows run.

Rows are one sample each (a long reasoning trace), so attention is causal over the row with no mask at SP 1 and SP 2
alike (the Ulysses core passes no mask for one-sample rows; with packed rows, sdpa needs a T x T mask on every
rank, which flash-attn varlen on GPUs avoids).

GPU (`--gpu`, SP 1 only, the command the GPU check script runs): a Qwen3-1.7B-shaped model from config (random
init, bf16, sdpa: causal rows, no mask, so torch picks its flash kernel), gradient checkpointing, fused loss, full
fine-tuning with torch AdamW, rows of 32k and 64k tokens: tokens/s over `--steps` optimizer steps after one
warm-up, and torch.cuda.max_memory_allocated. About 2 minutes on one H200.

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# CPU model: Qwen3-shaped, small enough for a 2-core machine; --quick is smaller still.
CPU_MODELS = {
    "quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=384, vocab_size=4096),
    "full": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                 intermediate_size=768, vocab_size=8192),
}
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(shape: dict, dtype, device: str, tiled_mlp: int = 0, checkpointing: bool = True):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from distthink.models.tiled_mlp import tile_mlps

    torch.manual_seed(0)
    cfg = Qwen3Config(**{**shape, "max_position_embeddings": max(shape.get("max_position_embeddings", 0), 1 << 17)})
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, None
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlps(model, tiled_mlp)
    return model


def one_sample_row(tokens: int, vocab: int, seed: int = 0) -> dict:
    """A packed micro-batch of one sample of `tokens` tokens, every target learned (weight 1)."""
    import torch

    from distthink.data.packing import collate_packed
    from distthink.data.types import EncodedSample

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (tokens,), generator=g).tolist()
    return collate_packed([EncodedSample(ids, ids, [1.0] * tokens)])


# ----------------------------------------------------------------------------------------------------
# CPU worker (1 process at SP 1, 2 gloo processes at SP 2).
# ----------------------------------------------------------------------------------------------------

def cpu_worker(out_path: str, opts: dict) -> None:
    import deepspeed
    import plan_validation as pv
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from distthink.engine import sequence_parallel as sp
    from distthink.engine.lm_loss import LMHeadLoss
    from distthink.models import ulysses
    from distthink.models.attention import model_inputs
    from distthink.models.tiled_mlp import tile_mlps

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = CPU_MODELS[opts["model"]]
    tracker = pv._make_tracker()
    with tracker:
        model = build_model(shape, torch.float32, "cpu")
    loss_part = LMHeadLoss(model, impl="fused", chunk_size=1024)
    if world > 1:  # what accelerate does at prepare() for distributed.sequence_parallel = world
        ulysses.install_packed_core("sdpa")
        UlyssesSPAttentionHF.register_with_transformers(model_name_or_path=model, core_attn_implementation="sdpa",
                                                        sequence_parallel_size=world, micro_batch_size=1,
                                                        seq_length_is_variable=True, disable_in_eval=False)
    lay = sp.layout(world, rank, world)
    params = [p for p in loss_part.parameters() if p.requires_grad]

    def step(tokens: int) -> None:
        row = sp.shard(one_sample_row(tokens, shape["vocab_size"]), lay)
        # one-sample rows: no mask, position_ids only (causal), at SP 1 as after the Ulysses gather at SP 2
        loss = loss_part(targets=row["targets"], target_weights=row["target_weights"],
                         **model_inputs(row, "ulysses_sp(sdpa)"))
        loss.backward()
        for p in params:
            p.grad = None

    def all_max(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    # 1. step time at a fixed length
    times = []
    for i in range(opts["steps"] + 1):
        dist.barrier()
        t0 = time.perf_counter()
        step(opts["time_tokens"])
        dist.barrier()
        if i:  # the first step warms up (allocations, kernels)
            times.append(time.perf_counter() - t0)
    result = {"world": world, "step_s": statistics.median(times), "steps_s": times}

    # 2. longest row under the cap, untiled then tiled (the same model, its MLPs patched in between)
    cap = opts["cap_mib"] * 2**20
    gran = 256

    def peak(tokens: int) -> float:
        with tracker:
            tracker.peak = tracker.live
            step(tokens)
            return all_max(tracker.peak)

    def longest() -> tuple[int, float]:
        lo, hi = 0, gran
        while peak(hi) <= cap:  # grow until over the cap
            lo, hi = hi, hi * 2
        while hi - lo > gran:
            mid = (lo + hi) // 2 // gran * gran
            if peak(mid) <= cap:
                lo = mid
            else:
                hi = mid
        return lo, (peak(lo) if lo else 0.0)

    result["longest"], result["peak_at_longest_mib"] = {}, {}
    for label, tiles in (("untiled", 0), ("tiled", opts["tiles"])):
        if tiles:
            tile_mlps(model, tiles)
        tokens, at = longest()
        result["longest"][label] = tokens  # whole-row tokens (each rank holds tokens / world)
        result["peak_at_longest_mib"][label] = round(at / 2**20, 1)
    result["state_mib"] = round(tracker.live / 2**20, 1)
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch_cpu(nproc: int, opts: dict, workdir: Path, timeout: float) -> dict:
    out = workdir / f"sp{nproc}.json"
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}",
           "--master_addr=127.0.0.1", me, "--worker", str(out), json.dumps(opts)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"SP {nproc}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["launch_s"] = round(time.time() - t0, 1)
    return res


def cpu_benchmark(args) -> dict:
    opts = {"model": "quick" if args.quick else "full", "steps": args.steps or (3 if args.quick else 5),
            "time_tokens": args.time_tokens or (4096 if args.quick else 8192),
            "cap_mib": args.cap_mib or (48 if args.quick else 160), "tiles": args.tiles}
    with tempfile.TemporaryDirectory() as tmp:
        one = launch_cpu(1, opts, Path(tmp), args.timeout)
        two = launch_cpu(2, opts, Path(tmp), args.timeout)
    longest = {f"sp{n}_{k}": r["longest"][k] for n, r in ((1, one), (2, two)) for k in ("untiled", "tiled")}
    return {"benchmark": "long_context", "mode": "cpu", "quick": bool(args.quick), "model": CPU_MODELS[opts["model"]],
            "time_tokens": opts["time_tokens"], "sp1_step_s": round(one["step_s"], 3),
            "sp2_step_s": round(two["step_s"], 3), "sp2_over_sp1": round(two["step_s"] / one["step_s"], 3),
            "cap_mib": opts["cap_mib"], "tiles": opts["tiles"], "longest_row_tokens": longest,
            "longest_sp2_over_sp1": {k: round(longest[f"sp2_{k}"] / max(longest[f"sp1_{k}"], 1), 2)
                                     for k in ("untiled", "tiled")},
            "peak_at_longest_mib": {"sp1": one["peak_at_longest_mib"], "sp2": two["peak_at_longest_mib"]},
            "launch_s": {"sp1": one["launch_s"], "sp2": two["launch_s"]}}


# ----------------------------------------------------------------------------------------------------
# GPU mode (one CUDA GPU, SP 1).
# ----------------------------------------------------------------------------------------------------

def gpu_benchmark(args) -> dict:
    import torch

    from distthink.data.packing import batch_to
    from distthink.engine.lm_loss import LMHeadLoss
    from distthink.launch.hardware import GPUS
    from distthink.launch.plan import ModelShape, RunShape, model_flops_per_token
    from distthink.models.attention import model_inputs

    dry = args.dry_run  # the same code on CPU with the quick model and short rows: does the GPU mode start?
    if not dry and not torch.cuda.is_available():
        return {"benchmark": "long_context", "mode": "gpu", "error": "no CUDA device"}
    dev = torch.device("cpu" if dry else "cuda")
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(dev)
    shape_cfg = {**CPU_MODELS["quick"], "tie_word_embeddings": True} if dry else QWEN3_1_7B
    model = build_model(shape_cfg, torch.float32 if dry else torch.bfloat16, dev.type,
                        tiled_mlp=args.tiles if args.gpu_tiled else 0)
    loss_part = LMHeadLoss(model, impl="fused", chunk_size=4096)
    params = [p for p in loss_part.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    shape = ModelShape.from_hf_config({**shape_cfg, "model_type": "qwen3"})
    peak_flops = next((g.bf16_flops for k, g in GPUS.items() if k in name.lower()), None)
    sync = torch.cuda.synchronize if not dry else (lambda: None)
    rows = []
    for tokens in [int(x) for x in ("256,512" if dry else args.gpu_lengths).split(",")]:
        batch = batch_to(one_sample_row(tokens, shape_cfg["vocab_size"]), dev)
        kw = model_inputs(batch, "ulysses_sp(sdpa)")  # one-sample row: no mask, causal (sdpa's flash kernel)
        if not dry:
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        try:
            for i in range(args.steps + 1):
                sync()
                t0 = time.perf_counter()
                loss = loss_part(targets=batch["targets"], target_weights=batch["target_weights"], **kw)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                if i:
                    times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            flops = model_flops_per_token(shape, RunShape(tokens_per_micro_batch=tokens, seq_len=tokens,
                                                          lora_rank=None), recompute=False)
            rows.append({"tokens": tokens, "step_s": round(step, 3), "tokens_per_s": round(tokens / step, 1),
                         "peak_mem_gib": None if dry else round(torch.cuda.max_memory_allocated(dev) / 2**30, 2),
                         "mfu": round(tokens / step * flops / peak_flops, 3) if peak_flops else None,
                         "loss": float(loss.detach())})
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"tokens": tokens, "error": f"out of memory: {str(err)[:200]}"})
        del batch, kw
        if not dry:
            torch.cuda.empty_cache()
    return {"benchmark": "long_context", "mode": "gpu", "device": name, "torch": torch.__version__,
            "model": ("quick CPU model, fp32 (dry run)" if dry else "Qwen3-1.7B shape (random init), bf16")
                     + ", sdpa causal, gradient checkpointing, fused loss, full fine-tuning, torch AdamW",
            "tiled_mlp": args.tiles if args.gpu_tiled else 0,
            "sequence_parallel": 1, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        cpu_worker(argv[1], json.loads(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small CPU model, short sweeps (~4 min on 2 cores)")
    ap.add_argument("--gpu", action="store_true", help="GPU mode: Qwen3-1.7B-shaped rows on one CUDA GPU, SP 1")
    ap.add_argument("--gpu-lengths", default="32768,65536", help="row lengths of the GPU mode (default 32768,65536)")
    ap.add_argument("--gpu-tiled", action="store_true", help="GPU mode with the MLPs tiled (--tiles)")
    ap.add_argument("--dry-run", action="store_true", help="with --gpu: run the GPU mode's code on CPU with the "
                                                             "quick model and 256/512-token rows (seconds)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps after one warm-up (default 3 quick/GPU, 5)")
    ap.add_argument("--time-tokens", type=int, default=0, help="CPU row length of the step-time comparison")
    ap.add_argument("--cap-mib", type=float, default=0, help="CPU memory cap per rank for the longest-row search")
    ap.add_argument("--tiles", type=int, default=4, help="model.tiled_mlp tiles of the tiled variants (default 4)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per CPU launch")
    args = ap.parse_args(argv)
    if args.gpu:
        args.steps = args.steps or 3
        result = gpu_benchmark(args)
    else:
        result = cpu_benchmark(args)
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
