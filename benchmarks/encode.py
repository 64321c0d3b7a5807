"""Benchmark: encode_chat + padding-free packing on a realistic multi-turn reasoning dataset.

The dataset is generated here (seeded): 1-4 assistant turns, optional system prompt, reasoning on most
assistant turns, and mixed lengths (log-normal word counts: short chats and long chains of thought,
capped so a sample fits the 4096-token budget).

Measured:
- samples_per_s / tokens_per_s of encode_chat (single process) and of the whole pipeline
  (encode + plan micro-batches + collate every micro-batch);
- packing_efficiency: real tokens / token slots (micro-batches x budget) at budget 4096;
- padded_vs_packed_tokens_ratio: tokens a padded batch computes (each micro-batch's samples padded to
  its longest, one row per sample) / tokens the packed rows compute (the same micro-batches);
- collate_ms_per_micro_batch: the only packing work left in the training loop.

Whether encoding keeps up with a GPU: compared to an assumed GPU consumption rate (default 10,000
tokens/s per GPU, about a Llama-3-8B/Qwen3-8B bf16 step on one H100 at ~40% MFU: 6 x 8e9 FLOP/token ->
~8k tok/s full fine-tune, ~12k with LoRA). The JSON reports how many GPUs one CPU core feeds.

Usage: python benchmarks/encode.py [--quick] [--samples N] [--budget 4096] [--tokenizer tiny|PATH]
Last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWEN3_FIXTURE = ROOT / "tests" / "fixtures" / "qwen3"

# Common English words, so the tokenizer sees realistic ~1.3 tokens/word text (made-up words split
# into many more pieces and would make the benchmark look slower per word than real data).
COMMON = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had "
    "by word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father head stand own page should country found answer school grow "
    "study still learn plant cover food sun four between state keep eye never last let thought city tree "
    "cross farm hard start might story saw far sea draw left late run while press close night real life few "
    "north function value equation integer prime sum product derivative matrix vector probability proof "
    "assume suppose hence therefore check compute verify case step result"
).split()
MATH_BITS = ["=", "+", "-", "*", "/", "(", ")", "x", "y", "2", "3", "7", "12", "0.5", "so", "then", "therefore",
             "x^2", "\\frac{1}{2}", "n+1", "f(x)"]


def _vocabulary(rng: random.Random) -> list[str]:
    return sorted(set(COMMON))


def _text(rng: random.Random, vocab: list[str], n_words: int, mathy: float = 0.0) -> str:
    out, sentence = [], 0
    for _ in range(max(1, n_words)):
        w = rng.choice(MATH_BITS) if rng.random() < mathy else rng.choice(vocab)
        sentence += 1
        if sentence > rng.randint(8, 20):
            w, sentence = w + rng.choice([".", ".", "?", ",\n"]), 0
        out.append(w)
    return " ".join(out).capitalize() + "."


def _words(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def make_dataset(n: int, seed: int = 0, max_words: int = 2600) -> list[list[dict]]:
    """n conversations; each stays under ~max_words words so it fits a 4096-token budget."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    data = []
    for _ in range(n):
        msgs: list[dict] = []
        if rng.random() < 0.4:
            msgs.append({"role": "system", "content": _text(rng, vocab, rng.randint(8, 60))})
        turns = rng.choices([1, 2, 3, 4], weights=[0.55, 0.25, 0.12, 0.08])[0]
        budget = max_words
        for _t in range(turns):
            user = _words(rng, 40, 1.0, 3, 800)
            reasoning = _words(rng, 300, 1.0, 10, 2400) if rng.random() < 0.85 else 0
            answer = _words(rng, 100, 0.9, 3, 1200)
            if user + reasoning + answer > budget:
                break
            budget -= user + reasoning + answer
            msgs.append({"role": "user", "content": _text(rng, vocab, user, mathy=0.1)})
            turn = {"role": "assistant", "content": _text(rng, vocab, answer, mathy=0.05)}
            if reasoning:
                turn["reasoning_content"] = _text(rng, vocab, reasoning, mathy=0.3)
            msgs.append(turn)
        if not any(m["role"] == "assistant" for m in msgs):
            msgs.append({"role": "user", "content": _text(rng, vocab, 20)})
            msgs.append({"role": "assistant", "content": _text(rng, vocab, 40), "reasoning_content": _text(rng, vocab, 80)})
        data.append(msgs)
    return data


def load_tokenizer(name: str):
    if name == "tiny":
        from distthink.models.tiny import tiny_tokenizer

        return tiny_tokenizer("qwen3"), "tiny-qwen3"
    from transformers import AutoTokenizer

    label = "qwen3 (vendored real tokenizer)" if Path(name).resolve() == QWEN3_FIXTURE else str(name)
    return AutoTokenizer.from_pretrained(name), label


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min on 2 CPU cores)")
    ap.add_argument("--samples", type=int, default=None, help="conversations to generate (default 1000 quick, 5000 full)")
    ap.add_argument("--budget", type=int, default=4096, help="tokens per micro-batch (default 4096)")
    ap.add_argument("--world-size", type=int, default=8, help="ranks the micro-batch count is balanced over")
    ap.add_argument("--tokenizer", default=None,
                    help="'tiny' or a path; default: the vendored real Qwen3 tokenizer when present")
    ap.add_argument("--gpu-tokens-per-s", type=float, default=10_000.0,
                    help="assumed tokens/s one GPU consumes (default 10k: ~8B model step on an H100)")
    args = ap.parse_args(argv)

    from distthink.data.chat import encode_chat
    from distthink.data.packing import collate_packed, collate_padded, packing_efficiency, plan_bins

    n = args.samples or (1000 if args.quick else 5000)
    tok_name = args.tokenizer or (str(QWEN3_FIXTURE) if (QWEN3_FIXTURE / "tokenizer.json").exists() else "tiny")
    tokenizer, tok_label = load_tokenizer(tok_name)
    data = make_dataset(n, seed=0)

    encode_chat(tokenizer, data[0])  # warm-up: template compilation, tokenizer caches
    t0 = time.perf_counter()
    samples = [encode_chat(tokenizer, msgs, max_length=args.budget, truncation="truncate_right") for msgs in data]
    t_encode = time.perf_counter() - t0
    samples = [s for s in samples if s is not None and len(s) > 0]
    lengths = [len(s) for s in samples]
    real = sum(lengths)

    t1 = time.perf_counter()
    plan = plan_bins(lengths, args.budget, num_bins_multiple_of=args.world_size, seed=0, epoch=0)
    t_plan = time.perf_counter() - t1
    t2 = time.perf_counter()
    packed_slots = padded_slots = 0
    for mb in plan:
        chosen = [samples[i] for i in mb]
        packed_slots += collate_packed(chosen)["input_ids"].numel()
        padded_slots += len(mb) * max(len(s) for s in chosen)  # what collate_padded would allocate
    t_collate = time.perf_counter() - t2
    assert collate_padded([samples[i] for i in plan[0]])["input_ids"].numel() == len(plan[0]) * max(
        lengths[i] for i in plan[0])

    # Context for the padded figure: fixed-size random batches (the usual non-packed setup).
    per_mb = max(1, round(len(samples) / len(plan)))
    order = random.Random(1).sample(range(len(samples)), len(samples))
    random_padded = sum(len(c) * max(lengths[i] for i in c)
                        for c in (order[j:j + per_mb] for j in range(0, len(order), per_mb)))

    t_total = t_encode + t_plan + t_collate
    encode_tok_s = real / t_encode
    sorted_len = sorted(lengths)
    result = {
        "benchmark": "encode",
        "quick": bool(args.quick),
        "tokenizer": tok_label,
        "budget": args.budget,
        "world_size": args.world_size,
        "num_samples": len(samples),
        "num_micro_batches": len(plan),
        "tokens": real,
        "length_median": int(statistics.median(lengths)),
        "length_p95": int(sorted_len[int(0.95 * (len(sorted_len) - 1))]),
        "length_max": max(lengths),
        "samples_per_s": round(len(samples) / t_total, 1),
        "encode_samples_per_s": round(len(samples) / t_encode, 1),
        "encode_tokens_per_s": round(encode_tok_s),
        "plan_s": round(t_plan, 4),
        "collate_ms_per_micro_batch": round(1000 * t_collate / len(plan), 3),
        "packing_efficiency": round(packing_efficiency(lengths, plan, args.budget), 4),
        "padded_vs_packed_tokens_ratio": round(padded_slots / packed_slots, 3),
        "random_batches_padded_vs_packed_tokens_ratio": round(random_padded / packed_slots, 3),
        "assumed_gpu_tokens_per_s": args.gpu_tokens_per_s,
        "gpus_fed_per_cpu_core": round(encode_tok_s / args.gpu_tokens_per_s, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
