"""Benchmark: fused linear cross-entropy (weighted) vs naive, vs the 3-GEMM bound, vs Liger (GPU).

    python benchmarks/flce.py --quick        # CPU, < 1 min on 2 cores
    python benchmarks/flce.py                # Qwen3 vocabulary, H=1024 and H=4096

Every variant runs forward + backward of the *weighted* loss (random token weights in [0.5, 1.5], 10%
ignored targets) at Qwen3's vocabulary V=151,936.

Time: median of --repeats runs after one warm-up (the first timed run also measures memory); the
*_best ratios use the fastest run of each variant (more robust on a shared machine).
Memory (CPU): each variant runs in its own subprocess; peak RSS is reset after the inputs exist
(`echo 5 > /proc/self/clear_refs`) and VmHWM - VmRSS(before) is the variant's peak extra memory. glibc
serves these 100 MB+ buffers with mmap and returns them on free, so RSS tracks live tensors. On CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats.
`mem_ratio_vs_naive` excludes the gradients every implementation returns (grad_hidden, grad_weight);
`mem_ratio_vs_naive_incl_grads` includes them.
Time ratios: op / naive, op / (logits GEMM + grad_hidden GEMM + grad_weight GEMM, each one full-size
GEMM with preallocated outputs).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

V_QWEN3 = 151_936


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, v = args.n, args.h, args.v
    # in-place initialisation: no transient second copy of the (V, H) weight
    weight = torch.empty(v, h, device=dev, dtype=dtype).normal_(0, 0.02).requires_grad_()
    hidden = torch.empty(n, h, device=dev, dtype=dtype).normal_().requires_grad_()
    target = torch.randint(0, v, (n,), device=dev)
    target[torch.rand(n, device=dev) < 0.1] = -100
    tw = torch.rand(n, device=dev) + 0.5
    tw[target == -100] = 0
    norm = float(tw.sum())

    from distthink.ops import fused_linear_cross_entropy
    from distthink.ops.flce_reference import naive_fused_linear_cross_entropy

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_once():
        hidden.grad = None
        weight.grad = None
        if args.variant == "naive":
            loss, _ = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=tw, normalizer=norm)
            loss.backward()
        elif args.variant == "ours":
            kw = {}
            if args.dynamic:
                # think_end id 0 with position-id packing of 512-token samples: exercises both passes
                kw = dict(dynamic=args.dynamic, think_end_id=0, position_ids=torch.arange(n, device=dev) % 512)
            loss = fused_linear_cross_entropy(hidden, weight, target, token_weights=tw, normalizer=norm,
                                              backend=args.backend, chunk_size=args.chunk or None, **kw)
            loss.backward()
        elif args.variant == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            loss = liger_fused_linear_cross_entropy(hidden, weight, target, reduction="sum")
            loss[0].backward() if isinstance(loss, tuple) else loss.backward()
        elif args.variant == "gemm":
            with torch.no_grad():
                logits = run_once.logits
                torch.mm(hidden, weight.t(), out=logits)
                torch.mm(logits, weight, out=run_once.gh)
                torch.mm(logits.t(), hidden, out=run_once.gw)
        sync()

    if args.variant == "gemm":
        run_once.logits = torch.empty(n, v, device=dev, dtype=dtype)
        run_once.gh = torch.empty(n, h, device=dev, dtype=dtype)
        run_once.gw = torch.empty(v, h, device=dev, dtype=dtype)

    # run 1: warm-up (lazy initialisation, allocator); run 2: peak memory (and timed); runs 3..: timed
    grads_bytes = (n * h + v * h) * hidden.element_size()
    run_once()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
        peak_extra = torch.cuda.max_memory_allocated() - before
    else:
        import gc

        hidden.grad = weight.grad = None
        gc.collect()
        ok = _reset_peak_rss()
        before = _status_kb("VmRSS")
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
        peak_extra = (_status_kb("VmHWM") - before) * 1024 if ok else None
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "time_s": statistics.median(times), "times": times,
            "peak_extra_bytes": peak_extra, "grads_bytes": grads_bytes if args.variant != "gemm" else 0}


def run_variant(variant: str, n: int, h: int, v: int, device: str, dtype: str, repeats: int, threads: int,
                backend: str = "auto", dynamic: str = "", chunk: int = 0) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, __file__, "--worker", variant, "--n", str(n), "--h", str(h), "--v", str(v),
           "--device", device, "--dtype", dtype, "--repeats", str(repeats), "--backend", backend,
           "--chunk", str(chunk)]
    if dynamic:
        cmd += ["--dynamic", dynamic]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized run, < 1 min on 2 cores")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--h", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, default=V_QWEN3, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--dynamic", default="", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0 = automatic)")
    p.add_argument("--shape", action="append", default=None, metavar="N,H",
                   help="benchmark this (N, H) instead of the defaults (repeatable)")
    p.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-mode timings")
    args = p.parse_args(argv)

    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device == "cuda"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    threads = torch.get_num_threads()
    repeats = args.repeats or (2 if args.quick else 3)
    if on_gpu:
        shapes = [(8192, 1024), (8192, 4096)] if not args.quick else [(4096, 1024)]
    else:
        shapes = [(512, 1024)] if args.quick else [(2048, 1024), (1024, 4096)]
    if args.shape:
        shapes = [tuple(int(x) for x in sh.split(",")) for sh in args.shape]
    dynamic = [] if (args.quick or args.no_dynamic) else ["argmax", "soft"]

    results = []
    for n, h in shapes:
        r = {"N": n, "H": h, "V": V_QWEN3, "dtype": dtype}
        runs = {name: run_variant(name, n, h, V_QWEN3, device, dtype, repeats, threads, chunk=args.chunk)
                for name in ["ours", "naive", "gemm"] + (["liger"] if on_gpu else [])}
        for mode in dynamic:
            runs[f"ours_{mode}"] = run_variant("ours", n, h, V_QWEN3, device, dtype, repeats, threads,
                                               dynamic=mode, chunk=args.chunk)
        ours, naive = runs["ours"], runs["naive"]
        r["time_s"] = {k: round(x["time_s"], 4) for k, x in runs.items()}
        r["peak_extra_mb"] = {k: (None if x["peak_extra_bytes"] is None else round(x["peak_extra_bytes"] / 2**20, 1))
                              for k, x in runs.items()}
        r["time_best_s"] = {k: round(min(x["times"]), 4) for k, x in runs.items()}
        r["time_ratio_vs_naive"] = round(ours["time_s"] / naive["time_s"], 3)
        # best-of-repeats ratios: less sensitive to other jobs on a shared machine
        r["time_ratio_vs_naive_best"] = round(min(ours["times"]) / min(naive["times"]), 3)
        r["time_ratio_vs_matmul_bound_best"] = round(min(ours["times"]) / min(runs["gemm"]["times"]), 3)
        r["time_ratio_vs_matmul_bound"] = round(ours["time_s"] / runs["gemm"]["time_s"], 3)
        if ours["peak_extra_bytes"] is not None and naive["peak_extra_bytes"]:
            g = ours["grads_bytes"]
            r["mem_ratio_vs_naive"] = round(max(ours["peak_extra_bytes"] - g, 0) /
                                            max(naive["peak_extra_bytes"] - g, 1), 3)
            r["mem_ratio_vs_naive_incl_grads"] = round(ours["peak_extra_bytes"] / naive["peak_extra_bytes"], 3)
        else:
            r["mem_ratio_vs_naive"] = r["mem_ratio_vs_naive_incl_grads"] = None
        if on_gpu:
            lg = runs["liger"]
            r["time_ratio_vs_liger_unweighted"] = round(ours["time_s"] / lg["time_s"], 3)
            r["mem_ratio_vs_liger_unweighted"] = round(ours["peak_extra_bytes"] / lg["peak_extra_bytes"], 3)
        else:
            r["time_ratio_vs_liger_unweighted"] = r["mem_ratio_vs_liger_unweighted"] = None
        for mode in dynamic:
            r[f"time_ratio_dynamic_{mode}_vs_static"] = round(runs[f"ours_{mode}"]["time_s"] / ours["time_s"], 3)
        results.append(r)
        print(json.dumps(r), file=sys.stderr)

    head = results[0]
    summary = {
        "benchmark": "flce",
        "device": device if not on_gpu else torch.cuda.get_device_name(0),
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "quick": bool(args.quick),
        "V": V_QWEN3,
        "N": head["N"], "H": head["H"], "dtype": dtype,
        "mem_ratio_vs_naive": head["mem_ratio_vs_naive"],
        "mem_ratio_vs_naive_incl_grads": head["mem_ratio_vs_naive_incl_grads"],
        "time_ratio_vs_naive": head["time_ratio_vs_naive"],
        "time_ratio_vs_matmul_bound": head["time_ratio_vs_matmul_bound"],
        "time_ratio_vs_naive_best": head["time_ratio_vs_naive_best"],
        "time_ratio_vs_matmul_bound_best": head["time_ratio_vs_matmul_bound_best"],
        "time_ratio_vs_liger_unweighted": head["time_ratio_vs_liger_unweighted"],
        "mem_ratio_vs_liger_unweighted": head["mem_ratio_vs_liger_unweighted"],
        "shapes": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
