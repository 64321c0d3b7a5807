"""Deterministic generator of the bundled sample SFT data (distthink/assets/sample_sft*.jsonl).

The tasks are templated arithmetic and string puzzles with short step-by-step reasoning, so a tiny model
(hidden 64, 2 layers) visibly lowers its loss within a few hundred CPU steps: the reasoning and answer
follow fixed patterns the model can pick up, while the numbers/words vary.

Regenerate (byte-identical output, no randomness outside the seeded `random.Random`):

    python -m distthink.data.sample_data
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from distthink.resources import ASSETS

TRAIN_PATH = ASSETS / "sample_sft.jsonl"
EVAL_PATH = ASSETS / "sample_sft_eval.jsonl"
FORMS_PATH = ASSETS / "sample_forms.jsonl"

SYSTEM_PROMPTS = [
    "You are a careful assistant. Think step by step.",
    "You solve small puzzles. Show your reasoning briefly.",
]
WORDS = ["cat", "dog", "sun", "tree", "book", "lamp", "fish", "bird", "star", "moon", "rain", "leaf",
         "milk", "door", "ship", "road", "wind", "fire", "snow", "gold"]


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    return (f"What is {a} + {b}?", f"We add {a} and {b}. {a} + {b} = {a + b}.", f"The answer is {a + b}.")


def _sub(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return (f"What is {a} - {b}?", f"We subtract {b} from {a}. {a} - {b} = {a - b}.", f"The answer is {a - b}.")


def _mul(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"What is {a} * {b}?", f"We multiply {a} by {b}. {a} * {b} = {a * b}.", f"The answer is {a * b}.")


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    letters = " ".join(w)
    rev = w[::-1]
    return (f"Reverse the word {w}.", f"The letters are {letters}. Backwards they are {' '.join(rev)}.",
            f"The reversed word is {rev}.")


def _count(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return (f"How many letters are in {w}?", f"The letters are {' '.join(w)}. That is {len(w)} letters.",
            f"There are {len(w)} letters.")


TASKS = [_add, _sub, _mul, _reverse, _count]


def _follow_up(rng: random.Random, answer_value: int) -> tuple[str, str, str]:
    k = rng.randint(1, 9)
    return (f"Now add {k} to that.", f"The previous answer was {answer_value}. {answer_value} + {k} = "
            f"{answer_value + k}.", f"The answer is {answer_value + k}.")


def make_sample(rng: random.Random) -> dict[str, Any]:
    """One `messages` sample: optional system prompt, 1-2 user/assistant exchanges, reasoning_content on
    every assistant turn, an occasional loss_weight."""
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    task = rng.choice(TASKS)
    q, r, a = task(rng)
    messages.append({"role": "user", "content": q})
    turn: dict[str, Any] = {"role": "assistant", "content": a, "reasoning_content": r}
    if rng.random() < 0.1:
        turn["loss_weight"] = 0.5
    messages.append(turn)
    if task in (_add, _sub, _mul) and rng.random() < 0.3:
        value = int(a.rstrip(".").split()[-1])
        q2, r2, a2 = _follow_up(rng, value)
        messages.append({"role": "user", "content": q2})
        messages.append({"role": "assistant", "content": a2, "reasoning_content": r2})
    return {"messages": messages}


def make_form_samples(rng: random.Random, n: int = 30) -> list[dict[str, Any]]:
    """The other two sample forms (prompt/completion and instruction/response), for docs and tests."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        q, r, a = rng.choice(TASKS)(rng)
        if i % 2 == 0:
            out.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"})
        else:
            out.append({"instruction": q, "response": a})
    return out


def generate(n_train: int = 300, n_eval: int = 60, seed: int = 1234) -> tuple[list, list, list]:
    rng = random.Random(seed)
    train = [make_sample(rng) for _ in range(n_train)]
    eval_ = [make_sample(rng) for _ in range(n_eval)]
    forms = make_form_samples(rng)
    return train, eval_, forms


def tokenizer_training_text() -> list[str]:
    """Text the tiny BPE tokenizers are trained on (deterministic)."""
    train, eval_, forms = generate()
    lines: list[str] = []
    for rec in train + eval_:
        for m in rec["messages"]:
            lines.append(m["content"])
            if m.get("reasoning_content"):
                lines.append(m["reasoning_content"])
    for rec in forms:
        lines.extend(str(v) for v in rec.values())
    lines.extend(SYSTEM_PROMPTS)
    lines.append("User: Assistant: Tool: ### Instruction:\n### Response:\nsystem user assistant tool\n\n")
    lines.append("The quick brown fox jumps over the lazy dog. Hello, world! How are you today?")
    return lines


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    train, eval_, forms = generate()
    ASSETS.mkdir(parents=True, exist_ok=True)
    _write_jsonl(TRAIN_PATH, train)
    _write_jsonl(EVAL_PATH, eval_)
    _write_jsonl(FORMS_PATH, forms)
    print(f"wrote {len(train)} train, {len(eval_)} eval, {len(forms)} other-form samples to {ASSETS}")


if __name__ == "__main__":
    main()
