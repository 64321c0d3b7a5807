"""Benchmark: the GEMM floor of a chunked fused cross-entropy, without any cross-entropy.

    python benchmarks/flce_gemm_floor.py --quick     # N=512, H=1024, < 1 min on 2 cores
    python benchmarks/flce_gemm_floor.py             # adds N=1024, H=4096 (a few minutes)

Why this exists: `benchmarks/flce.py` compares the fused op with three *full-height* GEMMs (logits,
grad_hidden, grad_weight over all N rows). A fused op that keeps peak extra memory <= 0.15x naive cannot
run full-height GEMMs: its transient (chunk, V) buffer must stay near 0.15 * N rows, so it runs the same
three products N / chunk times on `chunk` rows each. This script times exactly those products, with
nothing else (no softmax, no indexing), for several chunk heights and operand layouts:

    rows      x @ W.T -> (c, V);  g @ W -> (c, H);  grad_W += g.T @ x     (the op's layout)
    rows_T    W @ x.T -> (V, c);  g_T.T @ W;        grad_W += g_T @ x      (vocab-major buffer)

`floor_ratio` = (sum of the chunked GEMMs) / (the three full-height GEMMs). If the floor at the chunk
height the memory target allows is above a time target, no schedule built from these torch GEMMs can meet
that target on this machine; the fused op's own time is this floor plus its softmax and bookkeeping.

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

V_QWEN3 = 151_936


def _best_time(fn, repeats: int) -> float:
    fn()                                      # warm-up: MKL's per-shape buffers, page faults
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_shape(n: int, h: int, v: int, chunks: list[int], repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    weight = torch.empty(v, h).normal_(0, 0.02)
    hidden = torch.randn(n, h)
    grad_w = torch.empty(v, h)
    out = {"N": n, "H": h, "V": v}

    logits = torch.empty(n, v)
    grad_h = torch.empty(n, h)
    full = {
        "logits": _best_time(lambda: torch.matmul(hidden, weight.t(), out=logits), repeats),
        "grad_hidden": _best_time(lambda: torch.matmul(logits, weight, out=grad_h), repeats),
        "grad_weight": _best_time(lambda: torch.matmul(logits.t(), hidden, out=grad_w), repeats),
    }
    del logits, grad_h
    out["full_s"] = {k: round(t, 6) for k, t in full.items()}
    full_total = sum(full.values())
    out["full_total_s"] = round(full_total, 6)

    per_chunk = []
    for c in chunks:
        x = hidden[:c]
        k = n / c                             # chunks per step (fractional: the last one is shorter)
        buf = torch.empty(c, v)
        buf_t = torch.empty(v, c)
        gh = torch.empty(c, h)
        layouts = {
            "rows": (lambda: torch.matmul(x, weight.t(), out=buf),
                     lambda: torch.matmul(buf, weight, out=gh),
                     lambda: torch.addmm(grad_w, buf.t(), x, out=grad_w)),
            "rows_T": (lambda: torch.matmul(weight, x.t(), out=buf_t),
                       lambda: torch.matmul(buf_t.t(), weight, out=gh),
                       lambda: torch.addmm(grad_w, buf_t, x, out=grad_w)),
        }
        row = {"chunk": c, "approx_mem_ratio_vs_naive": round(c / n, 3)}
        for name, (f_logits, f_gh, f_gw) in layouts.items():
            parts = {"logits": _best_time(f_logits, repeats) * k, "grad_hidden": _best_time(f_gh, repeats) * k,
                     "grad_weight": _best_time(f_gw, repeats) * k}
            total = sum(parts.values())
            row[name] = {"parts_s": {p: round(t, 6) for p, t in parts.items()}, "total_s": round(total, 6),
                         "floor_ratio": round(total / full_total, 3)}
        per_chunk.append(row)
        print(json.dumps({"N": n, "H": h, **row}), flush=True)
        del buf, buf_t
    out["chunks"] = per_chunk
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=512, H=1024 only")
    p.add_argument("--shape", action="append", default=None, metavar="N,H", help="measure this shape (repeatable)")
    p.add_argument("--chunks", default=None,
                   help="comma-separated chunk heights (default: the op's automatic chunk, then 2x and 4x it)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from distthink.ops import auto_chunk_size

    shapes = [(512, 1024)] if args.quick else [(512, 1024), (1024, 4096)]
    if args.shape:
        shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shape]
    results = []
    for n, h in shapes:
        if args.chunks:
            chunks = [int(c) for c in args.chunks.split(",")]
        else:
            auto = auto_chunk_size(n, V_QWEN3, torch.float32)
            chunks = sorted({auto, min(n, 2 * auto), min(n, 4 * auto)})
        results.append(measure_shape(n, h, V_QWEN3, chunks, args.repeats))

    head = results[0]
    auto_row = head["chunks"][0]
    summary = {
        "benchmark": "flce_gemm_floor",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "N": head["N"], "H": head["H"], "V": V_QWEN3,
        "chunk": auto_row["chunk"],
        "floor_ratio": auto_row["rows"]["floor_ratio"],
        "floor_ratio_rows_T": auto_row["rows_T"]["floor_ratio"],
        "shapes": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
