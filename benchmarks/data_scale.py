"""Benchmark: data at scale - the encoded-data cache (docs/data.md, "Large datasets"; issue #18's targets).

A synthetic multi-turn reasoning corpus (the generator of benchmarks/encode.py: system prompts, 1-4 turns,
reasoning on most assistant turns) is written as JSONL at two sizes A < B and encoded with the real Qwen3
tokenizer (vendored) through the engine's own code path (SFT task, data.policy defaults, max_length 4096).

Measured:
- encode_tokens_per_s at 1 and 2 processes (corpus A, cold: into an empty cache folder; wall time of the whole
  build: pool start, reading, encoding, writing, fsync) and their ratio (target >= 1.7x at 2), next to
  cpu_parallel_reference_2proc: what two pure-Python loops gain from a second process on this machine right then
  (a shared machine's neighbours cap both);
- cache_bytes_per_token: bytes on disk of entry B / its tokens (target <= 8);
- uss_mib: unique memory (USS = Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup) that the dataset adds
  to each rank of a 2-rank gloo launch (torchrun), at A and at B (the cache already built): after the process
  group and the tokenizer exist, each rank opens the split through engine.batching.load_split (rank 0 fingerprints
  it, both open it), plans with make_sampler and collates every micro-batch of its share of one epoch (every row
  it reads in an epoch). USS is sampled throughout; the peak minus the baseline is reported, with the slope in
  bytes per token between A and B (target <= 64 MiB at 50 M tokens, flat);
- cached_startup_s: in that launch at B, rank 0's time from calling load_split on the cached split to the epoch-0
  plan (fingerprint with the tokenizer digest and the source-hash memo, the collective that hands the key to the
  other rank, open, lengths, packing plan); target <= 5 s at 50 M tokens. Python/torch/transformers imports and
  the process-group set-up come before and are not counted;
- inmemory_bytes_per_token: for comparison, what the former path (build_sft_dataset's Python lists) adds per
  token, measured in this process on corpus A.

Usage: python benchmarks/data_scale.py [--quick] [--sizes A B] [--keep DIR]
  --quick: A = 0.4 M, B = 1.2 M tokens (about a minute on 2 idle cores); default (full): A = 5 M, B = 50 M.
Last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWEN3 = ROOT / "tests" / "fixtures" / "qwen3"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import make_dataset  # noqa: E402 - the same corpus generator as the encoding benchmark

from distthink.config import load_config  # noqa: E402
from distthink.data.dataset import build_sft_dataset  # noqa: E402
from distthink.engine import batching  # noqa: E402
from distthink.engine import distributed as dist  # noqa: E402
from distthink.engine.task import make_task  # noqa: E402
from distthink.models.load import load_tokenizer  # noqa: E402

TOKENS_PER_RECORD_GUESS = 990  # measured on this generator with Qwen3 (default policy); sizes the corpus only


def uss_mib(pid: int | str = "self") -> float:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                fields[m.group(1)] = int(m.group(2))
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def overrides(corpus: Path, cache: Path, num_proc: int) -> list[str]:
    return [f"model.tokenizer={QWEN3}", f"data.train={corpus}", "data.eval=null", f"data.cache_dir={cache}",
            f"data.num_proc={num_proc}", "data.max_length=4096", "batch.max_tokens=4096", "logging.progress=false"]


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_parallel_reference(n: int = 10_000_000) -> float:
    """Speed-up of two pure-Python loops in two processes over one: the parallelism this (shared) machine gives
    right now, the ceiling for encode_speedup_2proc (a busy neighbour or SMT siblings pull it below 2)."""
    import multiprocessing as mp

    one = float("inf")
    for _ in range(2):  # the first loop also warms up
        t0 = time.perf_counter()
        _spin(n)
        one = min(one, time.perf_counter() - t0)
    with mp.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, [n, n])
        two = time.perf_counter() - t0
    return 2 * one / two


def write_corpus(path: Path, tokens: int, seed: int) -> int:
    n = max(1, tokens // TOKENS_PER_RECORD_GUESS)
    with open(path, "w") as fh:
        for conv in make_dataset(n, seed=seed):
            fh.write(json.dumps({"messages": conv}) + "\n")
    return n


def build(corpus: Path, cache: Path, num_proc: int) -> dict:
    """Build the cache entry of `corpus` in this process with the engine's code path; the figures of meta.json."""

    cfg = load_config(None, overrides(corpus, cache, num_proc))
    tok = load_tokenizer(cfg)
    task = make_task(cfg)
    task.prepare_tokenizer(tok)
    data = batching.load_split(cfg, task, "train", tok)
    return {"tokens": int(data.meta["tokens"]), "samples": len(data), "encode_s": data.meta["encode_s"],
            "bytes_per_token": data.nbytes / int(data.meta["tokens"])}


# ----------------------------------------------------------------------------------------------------------
# Workers (run as separate processes).

def uss_worker(args) -> None:

    cfg = load_config(None, overrides(Path(args.corpus), Path(args.cache), 1))
    acc = dist.setup(cfg)
    tok = load_tokenizer(cfg)
    task = make_task(cfg)
    task.prepare_tokenizer(tok)
    collate = task.collator(tok)
    dist.barrier()
    base = peak = uss_mib()
    t0 = time.perf_counter()
    data = batching.load_split(cfg, task, "train", tok)
    sampler = batching.make_sampler(cfg, data, world=acc.num_processes, rank=acc.process_index,
                                    grad_accumulation=1, shuffle=True)
    plan = sampler.rank_batches(0)
    startup_s = time.perf_counter() - t0
    tokens = 0
    for k, b in enumerate(plan):
        batch = collate([data[i] for i in b])
        tokens += int(batch["input_ids"].numel())
        if k % 16 == 0:
            peak = max(peak, uss_mib())
    peak = max(peak, uss_mib())
    res = {"rank": acc.process_index, "uss_base_mib": round(base, 1), "uss_peak_mib": round(peak, 1),
           "dataset_uss_mib": round(peak - base, 2), "tokens_read": tokens, "split_tokens": int(data.meta["tokens"]),
           "startup_s": round(startup_s, 3)}
    Path(f"{args.out}.{acc.process_index}").write_text(json.dumps(res))
    dist.barrier()
    dist.teardown(acc)


def inmemory_bytes_per_token(corpus: Path) -> float:
    """USS that build_sft_dataset's in-memory samples add per token (this process, after a warm-up)."""

    cfg = load_config(None, overrides(corpus, corpus.parent, 1))
    tok = load_tokenizer(cfg)
    build_sft_dataset([{"messages": [{"role": "user", "content": "warm"}, {"role": "assistant", "content": "up"}]}],
                      tok, batching.chat_policy(cfg))
    base = uss_mib()
    samples, report = build_sft_dataset(str(corpus), tok, batching.chat_policy(cfg))
    grown = uss_mib() - base
    del samples
    return grown * 2**20 / report.tokens


def uss_run(corpus: Path, cache: Path, tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"uss-{corpus.stem}"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", __file__, "--uss-worker", "--corpus", str(corpus), "--cache", str(cache),
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"2-rank USS run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]


# ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="A = 0.4 M, B = 1.2 M tokens (about a minute)")
    ap.add_argument("--sizes", nargs=2, type=float, default=None, help="corpus sizes A B in tokens")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder)")
    ap.add_argument("--uss-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.uss_worker:
        uss_worker(args)
        return 0

    size_a, size_b = args.sizes or ((0.4e6, 1.2e6) if args.quick else (5e6, 50e6))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="distthink-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        corpora = {}
        for name, size, seed in (("A", size_a, 1), ("B", size_b, 2)):
            corpora[name] = work / f"corpus_{name}.jsonl"
            if not corpora[name].is_file():
                write_corpus(corpora[name], int(size), seed)
            print(f"corpus {name}: {corpora[name].stat().st_size / 2**20:.1f} MiB of JSONL", flush=True)

        # Encoding throughput at 1 and 2 processes (corpus A, cold: each into an empty cache folder).
        ceiling = cpu_parallel_reference()
        print(f"machine: two pure-Python loops in two processes run {ceiling:.2f}x as fast as one", flush=True)
        enc = {}
        for procs in (1, 2):
            cache = work / f"cache_np{procs}"
            shutil.rmtree(cache, ignore_errors=True)
            enc[procs] = build(corpora["A"], cache, procs)
            print(f"encode A with {procs} process(es): {enc[procs]['tokens'] / enc[procs]['encode_s']:,.0f} tokens/s "
                  f"({enc[procs]['tokens']:,} tokens in {enc[procs]['encode_s']:.1f} s)", flush=True)
        cache = work / "cache_np2"
        big = build(corpora["B"], cache, 2)
        print(f"encode B with 2 processes: {big['tokens']:,} tokens in {big['encode_s']:.1f} s, "
              f"{big['bytes_per_token']:.2f} bytes/token", flush=True)

        uss = {name: uss_run(corpora[name], cache, work) for name in ("A", "B")}
        for name in ("A", "B"):
            print(f"2-rank launch at {name}: dataset USS {[r['dataset_uss_mib'] for r in uss[name]]} MiB per rank, "
                  f"cached start-up {uss[name][0]['startup_s']:.2f} s", flush=True)
        inmem = inmemory_bytes_per_token(corpora["A"])

        tok_a, tok_b = enc[2]["tokens"], big["tokens"]
        worst = {name: max(r["dataset_uss_mib"] for r in uss[name]) for name in ("A", "B")}
        slope = (worst["B"] - worst["A"]) * 2**20 / (tok_b - tok_a)
        result = {
            "benchmark": "data_scale", "mode": "quick" if args.quick else "full",
            "tokenizer": "qwen3 (vendored real tokenizer)", "cpu_cores": len(os.sched_getaffinity(0)),
            "tokens": {"A": tok_a, "B": tok_b}, "samples": {"A": enc[2]["samples"], "B": big["samples"]},
            "encode_tokens_per_s_1proc": round(enc[1]["tokens"] / enc[1]["encode_s"]),
            "encode_tokens_per_s_2proc": round(enc[2]["tokens"] / enc[2]["encode_s"]),
            "encode_speedup_2proc": round(enc[1]["encode_s"] / enc[2]["encode_s"], 3),
            "cpu_parallel_reference_2proc": round(ceiling, 3),
            "cache_bytes_per_token": round(big["bytes_per_token"], 3),
            "cached_startup_s": uss["B"][0]["startup_s"],
            "uss_mib_per_rank": {name: [r["dataset_uss_mib"] for r in uss[name]] for name in ("A", "B")},
            "uss_slope_bytes_per_token": round(slope, 4),
            "inmemory_bytes_per_token": round(inmem, 1),
            "targets": {"encode_speedup_2proc": ">= 1.7", "cache_bytes_per_token": "<= 8",
                        "cached_startup_s": "<= 5 at 50M tokens", "uss_mib_per_rank": "<= 64 at 50M tokens, flat"},
            "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in
                                                                                       os.getloadavg()],
            "wall_s": round(time.time() - t_start, 1),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
