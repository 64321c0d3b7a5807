"""`distthink prepare --config X.yaml [k=v ...]`: encode a run's data splits into the shared cache ahead of time.

Run it on a CPU node (slurm/prepare.sbatch) before the GPU job: training then opens the cached splits in seconds
and never reads the source rows. It builds exactly what `distthink train` with the same config and overrides
would look up (same task, tokenizer, policy, data files), with `data.num_proc` processes, and prints per split its
size, tokens, learned tokens, skips and encoding time.
"""

from __future__ import annotations

from distthink.cli import add_run_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="encode a run's data splits into the shared cache ahead of training",
        description="Encode the train (and eval) split of a run config into the encoded-data cache "
                    "(data.cache_dir), exactly as `distthink train` with the same config would, so that training "
                    "starts from the cache. Prints size, tokens, learned tokens, skips and time per split. "
                    "See docs/data.md, 'Large datasets'.")
    add_run_arguments(p)
    p.add_argument("--splits", nargs="+", choices=("train", "eval"), default=None,
                   help="splits to build (default: train, and eval when data.eval is set)")
    p.add_argument("--num-proc", type=int, default=None,
                   help="encoding processes (default: data.num_proc; 0 = the cores this process may use)")
    p.add_argument("--json", action="store_true", help="print one JSON line per split instead of the table")
    p.set_defaults(func=_run)


def _run(args) -> int:
    # The command's imports stay here so that `distthink --help` stays fast.
    import json
    import time

    from distthink.config import load_config, resolve_cache_dir, resolve_num_proc
    from distthink.engine import batching
    from distthink.engine.task import make_task
    from distthink.errors import ConfigError
    from distthink.models.load import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    if args.num_proc is not None:
        if args.num_proc < 0:
            raise ConfigError(f"--num-proc {args.num_proc}. Fix: 0 (all cores) or a positive number")
        cfg.data.num_proc = args.num_proc
    splits = args.splits or (["train", "eval"] if cfg.data.eval else ["train"])
    if "eval" in splits and not cfg.data.eval:
        raise ConfigError("--splits eval but data.eval is not set. Fix: set data.eval or build train only")
    task = make_task(cfg)
    tokenizer = load_tokenizer(cfg)
    task.prepare_tokenizer(tokenizer)
    rows = []
    for split in splits:
        t0 = time.time()
        data = batching.load_split(cfg, task, split, tokenizer)
        meta = data.meta
        rep = meta["report"]
        built = meta.get("created_unix", 0) >= t0
        rows.append({"split": split, "status": "built" if built else "cached", "entry": str(data.path),
                     "samples": meta["samples"], "tokens": meta["tokens"], "learned_tokens": rep["learned_tokens"],
                     "records": rep["records"], "skipped": sum(rep["skipped"].values()), "truncated": rep["truncated"],
                     "bytes": data.nbytes, "bytes_per_token": data.nbytes / max(meta["tokens"], 1),
                     "encode_s": meta["encode_s"], "num_proc": meta["num_proc"], "seconds": round(time.time() - t0, 3)})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"encoded-data cache: {resolve_cache_dir(cfg)} ({resolve_num_proc(cfg)} encoding processes)")
    for r in rows:
        learned = f"{r['learned_tokens']:,} ({r['learned_tokens'] / max(r['tokens'], 1):.1%})"
        how = (f"encoded in {r['encode_s']:.1f} s with {r['num_proc']} process(es), "
               f"{r['tokens'] / max(r['encode_s'], 1e-9):,.0f} tokens/s" if r["status"] == "built"
               else f"already cached (encoded in {r['encode_s']:.1f} s when built); opened in {r['seconds']:.2f} s")
        print(f"{r['split']:>5}: {r['samples']:,} samples from {r['records']:,} records, {r['tokens']:,} tokens, "
              f"{learned} learned, {r['skipped']:,} skipped, {r['truncated']:,} truncated\n"
              f"       {r['bytes'] / 2**20:,.1f} MiB on disk ({r['bytes_per_token']:.2f} bytes/token), {how}\n"
              f"       {r['entry']}")
    return 0
