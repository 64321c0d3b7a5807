"""`distthink generate MODEL --input DATA --out G.jsonl`: batched generation, reasoning/answer records."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="batched generation from an export/checkpoint; reasoning/answer records to JSONL",
        description="Generate for every row of --input and stream {id, reasoning, answer, raw, finish_reason, "
                    "...} records to --out. Molecule rows (smiles[, description, id]) get the run's own captioning "
                    "prompt (graph tokens when the run had a graph encoder); chat rows use `messages`.")
    p.add_argument("model", help="a run's export/ dir, or checkpoints/step-N of a non-ZeRO-3 run")
    p.add_argument("--input", required=True,
                   help="JSONL of molecule rows or chat rows ({messages: [...]}); `demo` = the demo test split")
    p.add_argument("--out", required=True, help="output JSONL (written as records are generated)")
    p.add_argument("--thinking", action=argparse_bool(), default=None,
                   help="enable_thinking on/off (default: the run's think_mode, off for plain chats)")
    p.add_argument("--sample", action="store_true", help="sample (default greedy)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --sample: divide the logits by T before sampling; < 1 sharper, > 1 flatter "
                        "(default 1.0; must be > 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="with --sample: nucleus sampling, draw from the smallest set of tokens whose probability "
                        "adds up to P (default 1.0 = all tokens)")
    p.add_argument("--top-k", type=int, default=0,
                   help="with --sample: draw only from the K most likely tokens (default 0 = no limit)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most tokens generated per row, reasoning included (default 256); a row that reaches it "
                        "gets finish_reason=length")
    p.add_argument("--max-think-tokens", type=int, default=None, help="thinking budget; </think> forced after it")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows generated together in one batch (default 8); lower it if memory runs out")
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of --sample, so sampled generations repeat (default 0)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (default) = cuda when a GPU is visible, else cpu; cpu, cuda, "
                        "or cuda:N for one GPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype; auto (default) = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal only)")
    p.set_defaults(func=_run)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def load_rows(spec: str) -> tuple[list[dict], str]:
    from pathlib import Path

    from distthink.data.jsonl import iter_jsonl
    from distthink.errors import DataError
    from distthink.tasks.molecule.demo import load_demo

    if spec == "demo":
        return load_demo("test"), "demo:test"
    path = Path(spec)
    if not path.exists():
        raise DataError("input file does not exist", source=spec, fix="give a JSONL file, or `demo`")
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or not ("smiles" in row or "messages" in row):
            raise DataError("row has neither `smiles` nor `messages`", source=spec, line=n, field="smiles",
                            fix="molecule rows need smiles; chat rows need messages")
        row.setdefault("id", n - 1)
        rows.append(row)
    return rows, spec


def build_prompts(rows: list[dict], meta: dict, thinking: bool):
    """(messages, graphs) per row: molecule rows through caption_messages with the run's prompt settings."""
    from distthink.tasks.molecule.demo import caption_messages
    from distthink.tasks.molecule.graphs import smiles_to_graph

    use_graph = bool(meta.get("use_graph", False))
    msgs, graphs = [], []
    for n, row in enumerate(rows, 1):
        if "messages" in row:
            msgs.append(row["messages"])
            graphs.append([])
            continue
        msgs.append(caption_messages(row["smiles"], use_graph=use_graph, k=int(meta.get("graph_tokens", 1)),
                                     include_smiles=bool(meta.get("include_smiles", True)), thinking=thinking))
        graphs.append([smiles_to_graph(row["smiles"], row=n)] if use_graph else [])
    return msgs, graphs


def _run(args) -> int:
    import sys

    from distthink.config import device_for, dtype_for
    from distthink.inference.generate import GenerationOptions, load_generator, write_jsonl
    from distthink.tasks.molecule.model import load_graph_prompt_inputs

    rows, _ = load_rows(args.input)
    if args.limit:
        rows = rows[:args.limit]
    device = device_for(args.device, "--device")
    gen = load_generator(args.model, device=device, dtype=dtype_for(args.dtype, device),
                         prompt_inputs_loader=load_graph_prompt_inputs)
    thinking = args.thinking if args.thinking is not None else gen.meta.get("think_mode", "off") != "off"
    msgs, graphs = build_prompts(rows, gen.meta, thinking)
    opts = GenerationOptions(enable_thinking=thinking, do_sample=args.sample, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                             max_think_tokens=args.max_think_tokens, batch_size=args.batch_size, seed=args.seed)
    n = write_jsonl(gen.generate(msgs, graphs, opts, ids=[r["id"] for r in rows],
                                 progress=not args.no_progress and sys.stderr.isatty()), args.out)
    print(f"wrote {n} generations to {args.out}")
    return 0
