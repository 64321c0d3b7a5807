"""Benchmark: fused linear cross-entropy (weighted) vs naive, vs the 3-GEMM bound, vs Liger (GPU).

    python benchmarks/flce.py --quick        # CPU, < 1 min on 2 cores
    python benchmarks/flce.py                # Qwen3 vocabulary, H=1024 and H=4096

Every variant runs forward + backward of the *weighted* loss (random token weights in [0.5, 1.5], 10%
ignored targets) at Qwen3's vocabulary V=151,936.

Time: all variants in one process, interleaved round by round (one warm-up round, then --repeats
rounds), median per variant; the *_best ratios use the fastest run of each variant (more robust on a
shared machine).
Memory (CPU): each variant runs in its own subprocess (after one warm-up run, so MKL's cached per-shape
GEMM buffers are not charged to anyone); peak RSS is reset after the inputs exist
(`echo 5 > /proc/self/clear_refs`) and VmHWM - VmRSS(before) is the variant's peak extra memory. glibc
serves allocations >= 128 KiB with mmap (MALLOC_MMAP_THRESHOLD_ is set for the workers) and returns
them on free, so RSS tracks live tensors. On CUDA:
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
    """--measure mem: peak extra memory of one variant (own process). --measure time: all variants in one
    process, interleaved round by round (a warm-up round, then --repeats rounds), so that the load of other
    jobs on a shared machine hits every variant alike."""
    import torch

    def naive_weighted_ce(hidden, weight, target, token_weights, normalizer):
        """The baseline of trainers without a fused loss: full (N, V) logits, then weighted cross-entropy."""
        ce = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, ignore_index=-100, reduction="none")
        return (ce.float() * token_weights).sum() / normalizer

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

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    gemm_bufs = {}

    def run_once(variant, rows=n):
        x, t, w = hidden[:rows].detach().requires_grad_(), target[:rows], tw[:rows]
        weight.grad = None
        if variant == "naive":
            loss = naive_weighted_ce(x, weight, t, w, norm)
            loss.backward()
        elif variant.startswith("ours"):
            kw = {}
            mode = variant.split("_")[1] if "_" in variant else ""
            if mode:
                # think_end id 0 with position-id packing of 512-token samples: exercises both passes
                kw = dict(dynamic=mode, think_end_id=0, position_ids=torch.arange(rows, device=dev) % 512)
            loss = fused_linear_cross_entropy(x, weight, t, token_weights=w, normalizer=norm,
                                              backend=args.backend, chunk_size=args.chunk or None,
                                              strategy=args.strategy, **kw)
            loss.backward()
        elif variant == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            loss = liger_fused_linear_cross_entropy(x, weight, t, reduction="sum")
            loss[0].backward() if isinstance(loss, tuple) else loss.backward()
        elif variant == "gemm":
            with torch.no_grad():
                if rows not in gemm_bufs:
                    gemm_bufs.clear()
                    gemm_bufs[rows] = (torch.empty(rows, v, device=dev, dtype=dtype),
                                       torch.empty(rows, h, device=dev, dtype=dtype),
                                       torch.empty(v, h, device=dev, dtype=dtype))
                logits, gh, gw = gemm_bufs[rows]
                torch.matmul(x, weight.t(), out=logits)
                torch.matmul(logits, weight, out=gh)
                torch.matmul(logits.t(), x, out=gw)
        sync()

    variants = args.variant.split(",")
    if args.measure == "mem":
        (variant,) = variants
        # warm-up at the full shape: lazy initialisation, and MKL's per-shape GEMM buffers (MKL keeps one
        # the size of the GEMM output cached per process; neither variant is charged for it)
        run_once(variant)
        weight.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run_once(variant)
            peak_extra = torch.cuda.max_memory_allocated() - before
        else:
            import gc

            gc.collect()
            ok = _reset_peak_rss()
            before = _status_kb("VmRSS")
            run_once(variant)
            peak_extra = (_status_kb("VmHWM") - before) * 1024 if ok else None
        return {"variant": variant, "peak_extra_bytes": peak_extra,
                "grads_bytes": (n * h + v * h) * hidden.element_size()}

    times = {vname: [] for vname in variants}
    for round_ in range(args.repeats + 1):
        for vname in variants:
            t0 = time.perf_counter()
            run_once(vname)
            if round_:                                 # round 0 is the warm-up
                times[vname].append(time.perf_counter() - t0)
    return {vname: {"time_s": statistics.median(ts), "times": ts} for vname, ts in times.items()}


def _run_worker(extra: list, threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    # every allocation >= 128 KiB is its own mmap, returned on free: RSS then tracks live tensors (no
    # glibc heap retention from the dynamic mmap threshold)
    if "mem" in extra:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    out = subprocess.run([sys.executable, __file__] + extra, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {extra} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_shape(variants: list, n: int, h: int, v: int, device: str, dtype: str, repeats: int, threads: int,
              args) -> dict:
    common = ["--n", str(n), "--h", str(h), "--v", str(v), "--device", device, "--dtype", dtype,
              "--repeats", str(repeats), "--backend", args.backend, "--chunk", str(args.chunk),
              "--strategy", args.strategy]
    runs = _run_worker(["--worker", ",".join(variants), "--measure", "time"] + common, threads)
    for vname in variants:
        if vname != "gemm":
            runs[vname].update(_run_worker(["--worker", vname, "--measure", "mem"] + common, threads))
        else:
            runs[vname].update(peak_extra_bytes=None, grads_bytes=0)
    return runs


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
    p.add_argument("--backend", default="auto", help="fused op backend (auto|torch|liger)")
    p.add_argument("--strategy", default="auto", help="fused op strategy (auto|rows|vocab)")
    p.add_argument("--measure", default="time", help=argparse.SUPPRESS)
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
        names = ["ours", "naive", "gemm"] + (["liger"] if on_gpu else []) + [f"ours_{m}" for m in dynamic]
        runs = run_shape(names, n, h, V_QWEN3, device, dtype, repeats, threads, args)
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
