"""`distthink inspect`: see exactly which tokens a dataset trains, before spending GPU hours.

Loads a dataset with a tokenizer and a chat policy, exactly as training does (build_sft_dataset ->
encode_chat), prints N rendered samples with the learned spans highlighted, then statistics: learned
token fraction, length distribution, skipped samples by reason, and packing efficiency at a budget.
With no arguments it runs offline on the bundled sample data and the tiny Qwen3-style tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from distthink.data.types import IGNORE_INDEX, ON_ERROR_CHOICES, ON_ERROR_DEFAULT
from distthink.errors import ConfigError, DataError
from distthink.resources import ASSETS

BUNDLED_DATA = ASSETS / "sample_sft.jsonl"

# Span kinds of a rendered sample.
CONTEXT, LEARNED, WEIGHTED = "context", "learned", "weighted"
_ANSI = {LEARNED: "\033[1;32m", WEIGHTED: "\033[1;33m"}
_REASONING_ANSI = {CONTEXT: "\033[2;35m", LEARNED: "\033[1;36m", WEIGHTED: "\033[1;33m"}
_RESET = "\033[0m"

EPILOG = """\
how learned spans are shown:
  colour (a terminal): learned tokens in green, learned reasoning in cyan, any learned token whose loss
                       weight is not 1 in yellow; reasoning kept as context (--think mask) in dim magenta;
                       other context (system/user/tool text, role headers) uncoloured.
  brackets (piped):    [[learned text]], [[w=0.5|learned text]] for a weight other than 1, and
                       {{reasoning kept as context}} (learned reasoning is in [[...]] like other learned text).
examples:
  distthink inspect
  distthink inspect --data train.jsonl --tokenizer ./Qwen3-8B --think mask -n 5 --budget 8192
  distthink inspect --data messy.jsonl --on-error raise   # stop at the first bad row, with its line
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show which tokens a dataset trains (highlighted samples + stats)",
        description="Load a dataset + tokenizer + chat policy as training does and print N rendered samples "
                    "with the learned spans highlighted, then statistics (learned-token fraction, lengths, "
                    "skipped samples by reason, packing efficiency). Runs offline with no arguments.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=str(BUNDLED_DATA), metavar="PATH",
                   help="dataset file (JSONL, or any format the loader accepts). Default: the bundled "
                        "sample data distthink/assets/sample_sft.jsonl")
    p.add_argument("--tokenizer", default="tiny", metavar="NAME_OR_PATH",
                   help="a local tokenizer directory or hub name (its chat template is used), or "
                        "'tiny' / 'tiny:FAMILY' for the offline test tokenizers (families: qwen3, llama3, "
                        "deepseek_r1, plain, instruction). Default: tiny (Qwen3-style)")
    p.add_argument("--think", choices=["supervise", "mask", "drop"], default="supervise",
                   help="reasoning policy: supervise = learn the rendered reasoning incl. <think> tags "
                        "(default); mask = keep it in context at weight 0; drop = remove it from the sample")
    p.add_argument("--think-weight", type=float, default=None, metavar="W",
                   help="multiply the loss weight of reasoning tokens by W (default 1.0)")
    p.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                   help="pass enable_thinking to templates that take it (default: the template's own default)")
    p.add_argument("--expand-turns", action="store_true",
                   help="one sample per assistant turn, each rendered as the model sees it at inference")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="longest sample in tokens; longer ones follow --truncation (default: no limit)")
    p.add_argument("--truncation", choices=["truncate_left", "truncate_right", "drop"], default=None,
                   help="what --max-length does to a longer sample: cut the start, cut the end, or drop the "
                        "sample (counted as too_long). Default: truncate_right")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default=ON_ERROR_DEFAULT,
                   help=f"skip: skip malformed rows, count them by reason and show the first example of each; "
                        f"raise: stop at the first one with file/line/field/fix. Default: {ON_ERROR_DEFAULT}, "
                        f"as in training (data.on_error)")
    p.add_argument("-n", "--num-samples", type=int, default=3, metavar="N",
                   help="how many samples to print (default 3; 0 prints only the stats)")
    p.add_argument("--start", type=int, default=0, metavar="I",
                   help="index of the first sample to print (default 0)")
    p.add_argument("--budget", type=int, default=4096, metavar="TOKENS",
                   help="token budget per micro-batch for the packing-efficiency figure (default 4096)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="auto: colour when stdout is a terminal, brackets when piped (default)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------ loading

def policy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The chat policy from the flags; unset flags are left to the encoder's defaults."""
    kw: dict[str, Any] = {"think": args.think}
    if args.think_weight is not None:
        kw["think_weight"] = args.think_weight
    if args.enable_thinking is not None:
        kw["enable_thinking"] = args.enable_thinking == "true"
    if args.expand_turns:
        kw["expand_turns"] = True
    if args.max_length is not None:
        kw["max_length"] = args.max_length
    if args.truncation is not None:
        kw["truncation"] = args.truncation
    return kw


# ------------------------------------------------------------------------------------------ rendering

def _kind(label: int, weight: float) -> str:
    if label == IGNORE_INDEX:
        return CONTEXT
    return LEARNED if weight == 1.0 else WEIGHTED


def _reasoning_mask(sample) -> list[bool]:
    """Per token: inside a rendered reasoning block (encode_chat records meta['think_token_ranges'])."""
    flags = [False] * len(sample)
    for a, b in sample.meta.get("think_token_ranges", ()) or ():
        for t in range(max(0, a), min(len(flags), b)):
            flags[t] = True
    return flags


def token_runs(sample) -> list[tuple[str, float, bool, int, int]]:
    """Maximal runs of tokens with the same (kind, weight, is_reasoning): (kind, weight, reasoning,
    start, end) token ranges, end exclusive."""
    runs: list[tuple[str, float, bool, int, int]] = []
    reasoning = _reasoning_mask(sample)
    for t, (lab, w) in enumerate(zip(sample.labels, sample.loss_weights)):
        kind = _kind(lab, float(w))
        key = (kind, float(w) if kind != CONTEXT else 0.0, reasoning[t])
        if runs and runs[-1][:3] == key:
            runs[-1] = (*key, runs[-1][3], t + 1)
        else:
            runs.append((*key, t, t + 1))
    return runs


def render_sample(tokenizer, sample, *, color: bool) -> str:
    """The decoded sample with learned spans marked (ANSI colour or [[...]] brackets).

    Text pieces are cut from the decode of the whole sample at the character offsets of each run's
    decoded prefix, so the output is exactly `tokenizer.decode(input_ids)` plus markers (decoding runs
    separately could split multi-byte characters)."""
    ids = list(sample.input_ids)
    full = tokenizer.decode(ids, skip_special_tokens=False)
    out, prev = [], 0
    for kind, w, reasoning, _start, end in token_runs(sample):
        cut = len(tokenizer.decode(ids[:end], skip_special_tokens=False)) if end < len(ids) else len(full)
        cut = max(prev, min(cut, len(full)))
        piece = full[prev:cut]
        prev = cut
        if not piece:
            continue
        if color:
            code = _REASONING_ANSI[kind] if reasoning else _ANSI.get(kind)
            out.append(f"{code}{piece}{_RESET}" if code else piece)
        elif kind == CONTEXT:
            out.append(f"{{{{{piece}}}}}" if reasoning else piece)
        elif kind == WEIGHTED:
            out.append(f"[[w={w:g}|{piece}]]")
        else:
            out.append(f"[[{piece}]]")
    return "".join(out)


# ------------------------------------------------------------------------------------------ stats

def _percentile(sorted_vals: list[int], q: float) -> int:
    return sorted_vals[min(len(sorted_vals) - 1, int(round(q * (len(sorted_vals) - 1))))]


def dataset_stats(samples, budget: int) -> dict[str, Any]:
    """Learned-token fraction, length distribution and packing efficiency at `budget` (1 rank)."""
    from distthink.data.packing import packing_efficiency, plan_bins

    lengths = [len(s) for s in samples]
    total = sum(lengths)
    learned = sum(s.num_learned for s in samples)
    stats: dict[str, Any] = {
        "samples": len(samples),
        "tokens": total,
        "learned_tokens": learned,
        "learned_fraction": learned / total if total else 0.0,
        "weight_sum": sum(s.weight_sum for s in samples),
        "no_learned_tokens": sum(1 for s in samples if s.num_learned == 0),
    }
    if lengths:
        sl = sorted(lengths)
        stats.update(length_min=sl[0], length_median=_percentile(sl, 0.5), length_mean=total / len(sl),
                     length_p95=_percentile(sl, 0.95), length_max=sl[-1])
    fits = [L for L in lengths if L <= budget]
    stats["over_budget"] = len(lengths) - len(fits)
    if fits:
        plan = plan_bins(fits, budget, shuffle=False)
        stats["micro_batches"] = len(plan)
        stats["packing_efficiency"] = packing_efficiency(fits, plan, budget)
        padded = sum(len(b) * max(fits[i] for i in b) for b in plan)
        stats["padded_vs_packed_tokens_ratio"] = padded / sum(fits)
    return stats


def format_stats(stats: dict[str, Any], report, budget: int) -> str:
    lines = ["== stats =="]
    lines.append(f"samples: {stats['samples']}    tokens: {stats['tokens']}    learned tokens: "
                 f"{stats['learned_tokens']} ({100 * stats['learned_fraction']:.1f}%)    weight sum: "
                 f"{stats['weight_sum']:.1f}")
    if stats["samples"]:
        lines.append(f"length (tokens): min {stats['length_min']}  median {stats['length_median']}  mean "
                     f"{stats['length_mean']:.0f}  p95 {stats['length_p95']}  max {stats['length_max']}")
    if stats["no_learned_tokens"]:
        lines.append(f"WARNING: {stats['no_learned_tokens']} sample(s) have no learned token")
    if report is not None:
        lines.append(f"records: {report.records}    truncated: {report.truncated}")
        if report.num_skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(report.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"skipped: {report.num_skipped} ({reasons})")
            lines.extend(f"  e.g. {r}: {msg}" for r, msg in sorted(report.examples.items()))
        else:
            lines.append("skipped: none")
    if "packing_efficiency" in stats:
        lines.append(f"packing at {budget} tokens/micro-batch: {stats['micro_batches']} micro-batches, "
                     f"efficiency {stats['packing_efficiency']:.3f} (real tokens / slots); padding instead "
                     f"of packing would compute {stats['padded_vs_packed_tokens_ratio']:.2f}x the tokens")
    if stats["over_budget"]:
        lines.append(f"WARNING: {stats['over_budget']} sample(s) are longer than the budget {budget}: training "
                     "refuses them. Fix: --max-length <= budget with a truncation policy, or a larger budget")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command

def _nothing_to_inspect(data: str, report) -> DataError:
    """An empty dataset is an error, as in training: there is nothing to show and nothing to train."""
    if not report.records:
        return DataError("no records", source=str(data), reason="empty_dataset",
                         fix="point --data at a file with one JSON object per line (JSONL), a JSON list or a "
                             "Parquet file with rows")
    reasons = "; ".join(f"{n} x {r}, e.g. {report.examples[r]}"
                        for r, n in sorted(report.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return DataError(f"all {report.records} records were skipped ({reasons})", source=str(data),
                     reason="empty_dataset", fix="correct the rows as each example says; --on-error raise stops at "
                                                 "the first one with its line")


def _use_color(choice: str) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    return sys.stdout.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `distthink inspect | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    from distthink.data.chat import ChatPolicy
    from distthink.data.dataset import audit_labels, build_sft_dataset
    from distthink.errors import LabelAuditError
    from distthink.models.load import tokenizer_by_name

    if args.budget <= 0:
        raise ConfigError(f"--budget must be positive, got {args.budget}")
    tokenizer = tokenizer_by_name(args.tokenizer, option="--tokenizer", require_chat_template=True)
    policy = ChatPolicy(**policy_kwargs(args))
    # The label audit runs below, as a warning: inspect is where a user looks *why* training would refuse.
    samples, report = build_sft_dataset(args.data, tokenizer, policy, on_error=args.on_error, audit=False)
    if not samples:
        raise _nothing_to_inspect(args.data, report)
    color = _use_color(args.color)

    print(f"data: {args.data}\ntokenizer: {getattr(tokenizer, 'name_or_path', args.tokenizer)}\n"
          f"policy: {policy}")
    legend = ("learned = \033[1;32mgreen\033[0m, learned reasoning = \033[1;36mcyan\033[0m, weight != 1 = "
              "\033[1;33myellow\033[0m, reasoning as context = \033[2;35mdim magenta\033[0m" if color
              else "learned = [[...]], weight != 1 = [[w=W|...]], reasoning as context = {{...}}")
    print(f"legend: {legend}, context unmarked\n")
    shown = samples[args.start:args.start + max(0, args.num_samples)]
    for k, s in enumerate(shown, start=args.start):
        where = " ".join(str(x) for x in (Path(str(s.meta["source"])).name if s.meta.get("source") else None,
                                               f"line {s.meta['line']}" if s.meta.get("line") else None,
                                               f"turn {s.meta['turn']}" if "turn" in s.meta else None) if x)
        head = f"-- sample {k}: {len(s)} tokens, {s.num_learned} learned"
        print(head + (f" ({where})" if where else "") + " --")
        print(render_sample(tokenizer, s, color=color))
        print()
    print(format_stats(dataset_stats(samples, args.budget), report, args.budget))
    try:
        audit_labels(samples, policy.allow_full_sequence_loss, str(args.data))
    except LabelAuditError as err:
        print(f"WARNING: training would refuse this dataset: {err}")
    return 0
