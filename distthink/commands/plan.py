"""`distthink plan`: will this run fit in GPU memory, which ZeRO setting does it need, how fast will it go?

Reads the same config as `distthink train` (YAML + dotted overrides) but builds no model: only the model
config (AutoConfig of model.name_or_path, or the from_config model) is read. Prints, per GPU and for each
candidate setting, the memory terms and the time terms of distthink.launch.plan, then recommends the cheapest
setting that fits (the fastest; among equally fast ones the least communication), or says that nothing
fits and what to change. docs/scaling.md explains every term.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from distthink.cli import add_run_arguments
from distthink.data.types import IGNORE_INDEX
from distthink.errors import ConfigError
from distthink.launch import model_configs
from distthink.launch.hardware import CANDIDATES, GPUS

_EPILOG = """\
examples:
  distthink plan --config configs/my_run.yaml --nodes 2 --gpus-per-node 8 --gpu h100
  distthink plan model.name_or_path=meta-llama/Meta-Llama-3-8B model.from_config=null lora.enabled=false \\
      batch.max_tokens=4096 data.max_length=4096 model.gradient_checkpointing=true --nodes 1 --gpus-per-node 8
  distthink plan --config run.yaml --gpu a100-40 --gpu-mem 40GiB --dataset-tokens 2e9 --json

Write the key=value overrides together (before or after the options, not split by them).

Memory is per GPU: peak live tensors (params, master weights, optimizer, gradients, activations, loss
buffers, DeepSpeed buckets), plus the CUDA context and a 10% allocator margin. Time: FLOPs per token from
the model shape, divided by the GPU's dense bf16 peak times --hfu (the fraction of peak reached on the
arithmetic executed); ZeRO collectives over the slowest link, 70% hidden behind compute. Validated on CPU
against measured peaks (benchmarks/plan_validation.py); the GPU-specific terms are not validated here.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="estimate per-GPU memory, the ZeRO setting that fits, tokens/s and ETA (no weights loaded)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS),
                   help="GPU type: peak bf16 FLOP/s, memory and link bandwidths (default h100)")
    p.add_argument("--gpu-mem", default=None,
                   help="usable memory per GPU, e.g. 80GiB, 79GB, 40G (default: the --gpu type's memory)")
    p.add_argument("--hfu", type=float, default=0.45,
                   help="assumed hardware FLOP utilisation on the executed arithmetic (default 0.45)")
    p.add_argument("--comm-overlap", type=float, default=0.7,
                   help="fraction of compute time that hides communication (default 0.7)")
    p.add_argument("--dataset-tokens", type=float, default=None,
                   help="tokens in one epoch of the training data (default: estimated by encoding a sample of "
                        "data.train with the run's tokenizer)")
    p.add_argument("--sample-records", type=int, default=200,
                   help="records encoded to estimate the dataset size and learned fraction (default 200)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="plan a GPU run (bf16, flash-attn) or reproduce a CPU run (fp32 auto dtype, sdpa)")
    p.add_argument("--molora-adapters", type=int, default=0,
                   help="plan MoLoRA (distthink.models.molora) with E adapters per target (K group experts + 1 "
                        "global), rank lora.r on lora.target_modules; 0 = plain LoRA (default)")
    p.add_argument("--model-config", default=None, metavar="NAME_OR_PATH",
                   help="architecture config to plan with instead of looking up model.name_or_path: a config.json, "
                        f"a directory holding one, or a config shipped with distthink "
                        f"({', '.join(model_configs.names())}). Without it a hub model is read from the local "
                        "cache, then the hub, and from the shipped config when the hub is offline or unreachable")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help=f"comma-separated subset of {','.join(CANDIDATES)}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_run)


def parse_bytes(text: str) -> float:
    """'80GiB' -> 80 * 2**30, '80GB' / '80G' -> 80e9, '141e9' -> 141e9."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if not m:
        raise ConfigError(f"--gpu-mem {text!r} is not a size. Fix: write e.g. 80GiB, 79GB or 40G")
    value, unit = float(m.group(1)), (m.group(2) or "").lower().rstrip("b")
    if not unit:
        return value
    power = "kmgt".index(unit[0]) + 1
    return value * ((1024 if unit.endswith("i") else 1000) ** power)


def dataset_stats(cfg, sample_records: int) -> dict[str, Any]:
    """Estimate tokens per epoch: encode the first records of data.train with the run's tokenizer and
    chat policy, scale the mean length by the record count. A mixture's epoch holds as many samples as its
    sources together, drawn in proportion to their weights. Returns {} when it cannot be estimated."""
    from distthink.data.mixture import parse_sources
    from distthink.launch.plan import hub_reachable
    from distthink.models.load import load_tokenizer

    offline = not hub_reachable()
    try:
        tokenizer = load_tokenizer(cfg, local_files_only=offline)  # offline: the cache only, no retries
    except ConfigError:
        if not offline:
            raise
        return {"error": f"the tokenizer '{cfg.model.tokenizer or cfg.model.name_or_path}' is not in the local "
                         "cache and the hub is offline or unreachable, so the dataset cannot be measured. Fix: "
                         "--dataset-tokens N, or model.tokenizer=<a local tokenizer directory>"}
    parts = [(s.weight, _source_stats(cfg, s.path, tokenizer, sample_records)) for s in parse_sources(cfg.data.train)]
    if any(not st for _, st in parts):
        return {}
    if len(parts) == 1:
        return parts[0][1]
    samples = sum(st["records"] * st["kept"] for _, st in parts)
    mean = sum(w * st["mean_tokens"] for w, st in parts)
    learned = sum(w * st["mean_tokens"] * st["learned_fraction"] for w, st in parts) / mean
    return {"path": ", ".join(st["path"] for _, st in parts), "records": sum(st["records"] for _, st in parts),
            "sampled": sum(st["sampled"] for _, st in parts), "encoded": sum(st["encoded"] for _, st in parts),
            "mean_tokens": mean, "learned_fraction": learned, "dataset_tokens": samples * mean}


def _source_stats(cfg, spec: str, tokenizer, sample_records: int) -> dict[str, Any]:
    from itertools import islice

    from distthink.data.dataset import build_sft_dataset, iter_records
    from distthink.engine import batching as train_data

    path = train_data.resolve_path(spec, "train")
    records = [rec for _src, _line, rec in islice(iter_records(str(path)), sample_records)]
    samples, _report = build_sft_dataset(records, tokenizer, train_data.chat_policy(cfg), on_error="skip",
                                         audit=False)
    if not samples:
        return {}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n_records = pq.ParquetFile(path).metadata.num_rows
    elif path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            n_records = sum(1 for line in fh if line.strip())
    else:
        n_records = sum(1 for _ in iter_records(str(path)))
    tokens = sum(len(s) for s in samples)
    learned = sum(sum(1 for x in s.labels if x != IGNORE_INDEX) for s in samples)
    kept = len(samples) / max(1, len(records))
    return {"path": str(path), "records": n_records, "sampled": len(records), "encoded": len(samples),
            "mean_tokens": tokens / len(samples), "learned_fraction": learned / max(1, tokens), "kept": kept,
            "dataset_tokens": tokens / len(samples) * n_records * kept}


def build_plan(args) -> dict[str, Any]:
    from distthink.config import load_config
    from distthink.launch.hardware import CANDIDATES, DESCRIPTIONS, GPUS
    from distthink.launch.plan import (
        ModelShape,
        configured_candidate,
        estimate,
        plan_sequence_parallel,
        recommend,
        resolve_model_config,
        run_shape_from_config,
        sequence_parallel_advice,
    )

    cfg = load_config(args.config, args.overrides)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if not 0 < args.hfu <= 1:
        raise ConfigError(f"--hfu {args.hfu} must be in (0, 1]: it is a fraction of the GPU's peak")
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise ConfigError(f"--candidates {unknown} unknown. Fix: use some of {','.join(CANDIDATES)}")
    if cfg.distributed.sequence_parallel > 1:  # Ulysses runs on DeepSpeed only
        candidates = [c for c in candidates if c != "ddp"]
    model_config, model_source = resolve_model_config(cfg, args.model_config)
    shape = ModelShape.from_hf_config(model_config)
    data: dict[str, Any] = {}
    if args.dataset_tokens is None:
        try:
            data = dataset_stats(cfg, args.sample_records)
        except Exception as err:  # noqa: BLE001 - a plan without an ETA is still useful; say why
            data = {"error": f"{type(err).__name__}: {err}"}
    learned_fraction = data.get("learned_fraction", 1.0)
    run = run_shape_from_config(cfg, device=args.device, learned_fraction=learned_fraction)
    if args.molora_adapters:
        if run.full:
            raise ConfigError("--molora-adapters needs lora.enabled=true (MoLoRA replaces the LoRA adapters). "
                              "Fix: set lora.enabled=true")
        if args.molora_adapters < 2:
            raise ConfigError("--molora-adapters is E = K experts + 1 global adapter, at least 2")
        run.molora_adapters = args.molora_adapters
    gpu = GPUS[args.gpu]
    mem = parse_bytes(args.gpu_mem) if args.gpu_mem else gpu.mem_bytes
    dataset_tokens = args.dataset_tokens or data.get("dataset_tokens")
    n = args.nodes * args.gpus_per_node
    estimates = [estimate(shape, run, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=gpu,
                          gpu_mem_bytes=mem, candidate=c, hfu=args.hfu, comm_overlap=args.comm_overlap,
                          dataset_tokens=dataset_tokens, epochs=cfg.train.epochs,
                          max_steps=cfg.train.max_steps or None)
                 for c in candidates]
    best, message = recommend(estimates)
    configured = configured_candidate(cfg)
    if best is not None and configured != best.candidate:
        message += "\n" + _configured_line(cfg, configured, estimates, best)
    # Sequence parallelism: the SP degrees the model and GPU count allow, each with its cheapest fitting setting;
    # when the configured degree fits nothing, say which degree would.
    sp_rows = plan_sequence_parallel(shape, run, candidates, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                     gpu=gpu, gpu_mem_bytes=mem, hfu=args.hfu, comm_overlap=args.comm_overlap,
                                     dataset_tokens=dataset_tokens, epochs=cfg.train.epochs,
                                     max_steps=cfg.train.max_steps or None)
    sp_degree, sp_message = sequence_parallel_advice(sp_rows)
    if best is None or sp_degree != run.sequence_parallel or "offload" in best.candidate:
        message += "\n" + sp_message
    lora = None if run.full else shape.lora_params(run.lora_rank, run.lora_targets) * max(1, run.molora_adapters)
    return {
        "model": {"params": shape.num_params, "trainable": lora or shape.num_params, "layers": shape.num_layers,
                  "hidden": shape.hidden_size, "vocab": shape.vocab_size,
                  "source": model_source},
        "run": {**run.__dict__,
                "global_tokens_per_step": run.tokens_per_micro_batch * run.grad_accum * (n // run.sequence_parallel),
                "max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs},
        "cluster": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "gpu": args.gpu,
                    "gpu_mem_bytes": mem, "hfu": args.hfu, "comm_overlap": args.comm_overlap},
        "dataset": {**data, "dataset_tokens_used": dataset_tokens},
        "candidates": [{**e.as_dict(), "description": DESCRIPTIONS[e.candidate]} for e in estimates],
        "recommended": best.candidate if best else None,
        "configured": configured,
        "recommended_sequence_parallel": sp_degree,
        "sequence_parallel_options": [
            {"sequence_parallel": r["sequence_parallel"], "dp_size": r["dp_size"],
             "recommended": r["best"].candidate if r["best"] else None,
             "total_bytes": (r["best"] or r["smallest"]).total_bytes,
             "tokens_per_s": (r["best"] or r["smallest"]).tokens_per_s,
             "sp_comm_bytes": (r["best"] or r["smallest"]).sp_comm_bytes} for r in sp_rows],
        "message": message,
    }


def _configured_line(cfg, configured: str | None, estimates, best) -> str:
    """How the run's own distributed setting compares with the recommendation."""
    if configured is None:
        return (f"this config: distributed.deepspeed={cfg.distributed.deepspeed} matches no candidate "
                "(its ZeRO stage or offloads could not be read)")
    mine = next((e for e in estimates if e.candidate == configured), None)
    if mine is None:
        return f"this config uses {configured}, which --candidates left out"
    speed = mine.tokens_per_s / best.tokens_per_s
    return (f"this config uses {configured}: {'fits' if mine.fits else 'does NOT fit'}, "
            f"{mine.total_bytes / 2**30:.2f} GiB per GPU vs {best.total_bytes / 2**30:.2f}, {speed:.2f}x the "
            f"recommended tokens/s, {mine.comm_bytes / 1e9:.1f} GB vs {best.comm_bytes / 1e9:.1f} GB moved per GPU "
            "and step")


_UNIT = {"name": "GiB", "div": 2**30}


def _gib(x: float) -> str:
    return f"{x / _UNIT['div']:.2f}"


def _si(x: float) -> str:
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


_ROWS = [
    ("params (+ZeRO-3 gathered)", "params"), ("fp32 master weights", "master_weights"),
    ("optimizer (Adam m, v)", "optimizer"), ("grad partition (ZeRO-3)", "grad_partition"),
    ("grad partition (ZeRO-2)", "grad_partition_zero2"),
    ("comm buckets", "buckets"), ("ZeRO-2 buckets (in backward)", "buckets_zero2"), ("ZeRO-3 all-gather buffer", "gather_buffer"), ("activations [chosen]", "activations"),
    ("  without checkpointing", "activations_no_ckpt"), ("  with checkpointing", "activations_ckpt"),
    ("LoRA/MoLoRA branch activations", "lora_activations"), ("autocast 16-bit weight copies", "autocast_weights"), ("loss [chosen]", "loss"),
    ("  plain logits loss", "loss_plain"), ("  fused loss (chunk)", "loss_fused"),
    ("full gradients (no ZeRO)", "gradients"), ("optimizer-step temporaries", "optimizer_step_tmp"),
    ("CUDA/NCCL context", "cuda_context"), ("fragmentation margin", "fragmentation"),
]


_SHORT = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "zero3_offload_optimizer": "z3+off-opt",
          "zero3_offload_params": "z3+off-par"}


def render(plan: dict[str, Any]) -> str:
    m, r, c = plan["model"], plan["run"], plan["cluster"]
    est = plan["candidates"]
    n = c["nodes"] * c["gpus_per_node"]
    small = max(e["total_bytes"] for e in est) < 2**30
    _UNIT.update(name="MiB" if small else "GiB", div=2**20 if small else 2**30)
    method = ("full fine-tuning" if r["lora_rank"] is None
              else (f"MoLoRA {r['molora_adapters']} adapters" if r["molora_adapters"] else "LoRA")
              + f" r={r['lora_rank']} on " + ",".join(r["lora_targets"]))
    lines = [
        f"model   {m['source']}: {m['params'] / 1e9:.3f} B params, {m['layers']} layers, hidden {m['hidden']}, "
        f"vocab {m['vocab']}; {method} "
        f"({m['trainable'] / 1e6:.2f} M trainable)",
        f"run     {r['tokens_per_micro_batch']} tokens per micro-batch x GA {r['grad_accum']} x "
        f"{n // r['sequence_parallel']} data-parallel GPU group(s) = "
        f"{r['global_tokens_per_step']:,} tokens per step; {'bf16' if r['dtype_bytes'] == 2 else 'fp32'}, "
        f"{r['attention']} attention, checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, "
        f"{'fused loss (chunk ' + str(r['fused_chunk_tokens']) + ')' if r['fused_loss'] else 'plain logits loss'}"
        + (f"; sequence parallel {r['sequence_parallel']} ({r['tokens_per_micro_batch'] // r['sequence_parallel']} "
           f"tokens per GPU, {n // r['sequence_parallel']} data-parallel group(s))" if r["sequence_parallel"] > 1
           else "") + (f"; tiled MLP x{r['tiled_mlp']}" if r["tiled_mlp"] > 1 else ""),
        f"cluster {c['nodes']} node(s) x {c['gpus_per_node']} {c['gpu']}, {_gib(c['gpu_mem_bytes'])} GiB per GPU, "
        f"assumed HFU {c['hfu']:.2f}",
        "",
        f"memory per GPU ({_UNIT['name']})".ljust(30) + "".join(_SHORT[e["candidate"]].rjust(12) for e in est),
    ]
    short = _SHORT
    for label, key in _ROWS:
        lines.append(label.ljust(30) + "".join(_gib(e["memory"][key]).rjust(12) for e in est))
    lines.append("peak live tensors".ljust(30) + "".join(_gib(e["allocated_bytes"]).rjust(12) for e in est))
    lines.append("TOTAL (vs capacity)".ljust(30) + "".join(_gib(e["total_bytes"]).rjust(12) for e in est))
    lines.append("fits".ljust(30) + "".join(("yes" if e["fits"] else "NO").rjust(12) for e in est))
    lines += ["", "time per optimizer step".ljust(30) + "".join(short[e["candidate"]].rjust(12) for e in est)]
    rows = [("compute (s)", lambda e: f"{e['compute_seconds']:.3g}"),
            ("comm volume per GPU (GB)", lambda e: f"{e['comm_bytes'] / 1e9:.2f}"),
            ("  of which Ulysses all-to-all (GB)", lambda e: f"{e['sp_comm_bytes'] / 1e9:.2f}"),
            ("comm time (s)", lambda e: f"{e['comm_seconds']:.3g}"),
            ("offload time (s)", lambda e: f"{e['offload_seconds']:.3g}"),
            ("step (s)", lambda e: f"{e['step_seconds']:.3g}"),
            ("tokens/s (job)", lambda e: _si(e["tokens_per_s"])),
            ("tokens/s per GPU", lambda e: _si(e["tokens_per_s"] / n)),
            ("MFU (model FLOPs)", lambda e: f"{e['mfu']:.2f}"),
            ("ETA", lambda e: _duration(e["eta_seconds"]))]
    for label, fmt in rows:
        lines.append(label.ljust(30) + "".join(fmt(e).rjust(12) for e in est))
    d = plan["dataset"]
    lines.append("")
    if r["max_steps"]:
        lines.append(f"ETA: train.max_steps={r['max_steps']} optimizer steps (at most "
                     f"{r['global_tokens_per_step'] * r['max_steps']:,} tokens)")
    elif d.get("dataset_tokens_used"):
        src = (f"estimated from {d['encoded']} encoded records of {d['path']} ({d['records']:,} records, mean "
               f"{d['mean_tokens']:.0f} tokens)" if "mean_tokens" in d else "from --dataset-tokens")
        lines.append(f"ETA: {r['epochs']} epoch(s) of {d['dataset_tokens_used']:,.0f} tokens, {src}; packing fills "
                     "micro-batches below the budget, so real runs take somewhat longer")
    else:
        lines.append(f"ETA: unknown (pass --dataset-tokens){'; ' + d['error'] if d.get('error') else ''}")
    if len(plan["sequence_parallel_options"]) > 1:
        lines += ["", "sequence parallel N".ljust(30) + "".join(str(o["sequence_parallel"]).rjust(12)
                                                              for o in plan["sequence_parallel_options"])]
        for label, fmt in (("best setting", lambda o: _SHORT.get(o["recommended"], "none")),
                           ("GiB per GPU", lambda o: f"{o['total_bytes'] / 2**30:.1f}"),
                           ("tokens/s (job)", lambda o: _si(o["tokens_per_s"])),
                           ("all-to-all per GPU-step (GB)", lambda o: f"{o['sp_comm_bytes'] / 1e9:.2f}")):
            lines.append(label.ljust(30) + "".join(fmt(o).rjust(12) for o in plan["sequence_parallel_options"]))
    lines.append(plan["message"])
    return "\n".join(lines)


def _run(args) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan, indent=1, default=str))
    else:
        print(render(plan))
    return 0 if plan["recommended"] else 1
