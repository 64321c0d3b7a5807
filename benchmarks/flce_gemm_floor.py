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

`--schedules` also times, at the smallest chunk, whole chunk loops (GEMMs + softmax, no CE bookkeeping)
in the schedules one might try instead, in seconds per step:

    plain          logits -> softmax -> grad_hidden -> grad_weight, chunk by chunk (what the op does)
    tile_fused     per vocabulary tile: logits, then an online-softmax grad_hidden while the W tile is hot
    tile_deferred  tile_fused, plus each chunk's grad_weight done in the next chunk's tile loop
    mkl_packed     only the logits, through MKL's pre-packed weight (torch.ops.mkl._mkl_linear), and
                   the cost of packing W (needed every step, since W changes)

`floor_ratio` = (sum of the chunked GEMMs) / (the three full-height GEMMs). If the floor at the chunk
height the memory target allows is above a time target, no schedule built from these torch GEMMs can meet
that target on this machine; the fused op's own time is this floor plus its softmax and bookkeeping.

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
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


def make_inputs(n: int, h: int, v: int):
    """(weight (V, H), hidden (N, H), grad_weight buffer (V, H)), fp32, seeded; shared by both measurements."""
    import torch

    torch.manual_seed(0)
    return torch.empty(v, h).normal_(0, 0.02), torch.randn(n, h), torch.empty(v, h)


def measure_shape(weight, hidden, grad_w, chunks: list[int], repeats: int) -> dict:
    import torch

    (v, h), n = weight.shape, hidden.shape[0]
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


def _plain(weight, hidden, grad_w, c):
    import torch

    buf = torch.empty(c, weight.shape[0])
    for a in range(0, hidden.shape[0], c):
        x = hidden[a:a + c]
        b = buf[:x.shape[0]]
        torch.matmul(x, weight.t(), out=b)
        torch.softmax(b, 1, out=b)
        gh = torch.mm(b, weight)
        torch.addmm(grad_w, b.t(), x, out=grad_w)
    return gh                                  # the last chunk's softmax @ W (for the equivalence test)


def _tiled(weight, hidden, grad_w, c, tile, defer_grad_weight):
    """Chunk loop whose vocabulary is walked in tiles. grad_hidden uses an online softmax (running max and
    sum, rescaled per tile), so it needs no second pass. With defer_grad_weight, the previous chunk's
    probabilities, still in the buffer, feed grad_weight[tile] just before the tile is overwritten."""
    import torch

    v, h = weight.shape
    buf, tmp = torch.empty(c, v), torch.empty(c, tile)
    starts = list(range(0, hidden.shape[0], c))
    prev = None
    for a in starts + ([None] if defer_grad_weight else []):
        x = hidden[a:a + c] if a is not None else None
        if x is not None:
            run_max, run_sum = torch.full((c,), -math.inf), torch.zeros(c)
            gh = torch.zeros(c, h)
        for v0 in range(0, v, tile):
            v1 = min(v0 + tile, v)
            part = buf[:, v0:v1]
            if prev is not None:
                grad_w[v0:v1].addmm_(part.t(), prev)
            if x is None:
                continue
            torch.matmul(x, weight[v0:v1].t(), out=part)
            new_max = torch.maximum(run_max, part.amax(1))
            rescale = torch.exp(run_max - new_max)
            e = tmp[:, :v1 - v0]
            torch.sub(part, new_max[:, None], out=e).exp_()
            run_sum.mul_(rescale).add_(e.sum(1))
            gh.mul_(rescale[:, None]).addmm_(e, weight[v0:v1])
            run_max = new_max
        if x is None:
            break
        lse = run_max + torch.log(run_sum)
        gh.div_(run_sum[:, None])
        buf.sub_(lse[:, None]).exp_()
        if defer_grad_weight:
            prev = x
        else:
            torch.addmm(grad_w, buf.t(), x, out=grad_w)
    return gh


def measure_schedules(weight, hidden, grad_w, c: int, repeats: int, tiles=(1024, 4096, 16384)) -> dict:
    """The whole-loop schedules at chunk height c (N must be a multiple of c: the tiled loops take whole chunks)."""
    import torch

    (v, h), n = weight.shape, hidden.shape[0]
    out = {"chunk": c, "plain_s": round(_best_time(lambda: _plain(weight, hidden, grad_w, c), repeats), 6)}
    for tile in tiles:
        for name, defer in (("tile_fused", False), ("tile_deferred", True)):
            t = _best_time(lambda: _tiled(weight, hidden, grad_w, c, tile, defer), repeats)
            out[f"{name}_{tile}_s"] = round(t, 6)
    x = hidden[:c]
    buf = torch.empty(c, v)
    k = n / c
    # measured again (measure_shape has it too) so that it runs back to back with the packed variant below:
    # this machine's speed drifts over a run by more than the difference being measured
    out["logits_plain_s"] = round(_best_time(lambda: torch.matmul(x, weight.t(), out=buf), repeats) * k, 6)
    mkl = getattr(torch.ops, "mkl", None)
    if mkl is not None and hasattr(mkl, "_mkl_linear") and torch.backends.mkl.is_available():
        t0 = time.perf_counter()
        packed = mkl._mkl_reorder_linear_weight(weight, c)
        out["mkl_pack_s"] = round(time.perf_counter() - t0, 6)
        out["mkl_packed_mib"] = round(packed.numel() * packed.element_size() / 2**20, 1)
        out["logits_mkl_packed_s"] = round(
            _best_time(lambda: mkl._mkl_linear(x, packed, weight, None, c), repeats) * k, 6)
    print(json.dumps({"N": n, "H": h, "schedules": out}), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=512, H=1024 only")
    p.add_argument("--shape", action="append", default=None, metavar="N,H", help="measure this shape (repeatable)")
    p.add_argument("--chunks", default=None,
                   help="comma-separated chunk heights (default: the op's automatic chunk, then 2x and 4x it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--schedules", action="store_true",
                   help="also time alternative chunk-loop schedules at the smallest chunk (see above)")
    args = p.parse_args(argv)

    import torch

    from distthink.ops import auto_chunk_size

    shapes = [(512, 1024)] if args.quick else [(512, 1024), (1024, 4096)]
    if args.shape:
        shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shape]
    plan = []
    for n, h in shapes:
        if args.chunks:
            chunks = [int(c) for c in args.chunks.split(",")]
        else:
            auto = auto_chunk_size(n, V_QWEN3, torch.float32)
            chunks = sorted({auto, min(n, 2 * auto), min(n, 4 * auto)})
        if args.schedules and n % min(chunks):
            p.error(f"--schedules needs N divisible by the smallest chunk (N={n}, chunk {min(chunks)}). "
                    "Fix: pass --chunks whose smallest value divides N")
        plan.append((n, h, chunks))
    results = []
    for n, h, chunks in plan:
        inputs = make_inputs(n, h, V_QWEN3)
        results.append(measure_shape(*inputs, chunks, args.repeats))
        if args.schedules:
            results[-1]["schedules"] = measure_schedules(*inputs, min(chunks), args.repeats)
        del inputs

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
