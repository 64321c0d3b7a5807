"""Turn raw generated text into ``{reasoning, answer, raw, finish_reason}``, and close unfinished thoughts.

Models do not always emit tidy ``<think>…</think>`` blocks. The parser follows these rules (each has a test):

1. No tag at all -> ``reasoning=None``, the whole text (stripped) is the answer, state ``absent``.
2. ``<think>R</think>A`` -> reasoning ``R``, answer ``A`` (both stripped), state ``closed``.
3. A ``</think>`` with no open block closes an *implied* block that starts at the beginning of the text or at
   the end of the previous block. This is the normal Qwen3 case when the chat template already put
   ``<think>\\n`` into the prompt, so the generation begins inside the thought. Pass
   ``prompt_opened_think=True`` to say so explicitly (then text before the first tag is reasoning even if no
   ``</think>`` ever comes).
4. Unclosed thought (``<think>R`` and the generation ended, typically ``finish_reason="length"``) ->
   reasoning ``R``, answer ``""``, state ``unclosed``.
5. Several blocks -> reasoning is the blocks joined by a blank line; the answer is the text outside all
   blocks, joined by newlines; ``num_think_blocks`` says how many there were.
6. ``</think>`` at the very end -> state ``closed`` (or ``empty``) and ``answer == ""``.
7. Empty thought (``<think>\\n\\n</think>``, what Qwen3 renders with ``enable_thinking=False``) -> reasoning
   ``""``, state ``empty``.
8. A repeated ``<think>`` inside an open block is dropped (it opens nothing) and counted in ``anomalies``.
9. Generation is cut at the first stop string (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>`` by default)
   so text after the end of turn never leaks into the answer; surrounding whitespace never matters.

``well_formed`` is True when there is exactly one think block, it is closed (``closed`` or ``empty``), nothing
but whitespace precedes it, and no anomaly occurred. It describes the *block*; an empty answer is reported
separately (``has_answer``).

:func:`close_thoughts` (token ids) and :func:`close_thought_text` (strings) are what ``think_mode: free``
uses after sampling: keep the thought up to ``</think>``, or close an unfinished one and count it, so the gold
description can be appended after ``</think>``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal, Sequence

from distthink.errors import DistthinkError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")

ThinkState = Literal["absent", "closed", "empty", "unclosed"]

__all__ = ["ParsedGeneration", "parse_generation", "ClosedThoughts", "close_thoughts", "close_thought_text",
           "THINK_OPEN", "THINK_CLOSE", "DEFAULT_STOP_STRINGS"]


@dataclass
class ParsedGeneration:
    """One parsed generation. ``reasoning`` is None when the text has no think block at all."""

    reasoning: str | None
    answer: str
    raw: str
    finish_reason: str | None
    think_state: ThinkState
    num_think_blocks: int
    well_formed: bool
    anomalies: list[str] = field(default_factory=list)

    @property
    def has_answer(self) -> bool:
        return bool(self.answer)

    def to_dict(self) -> dict:
        return asdict(self)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cut = len(text)
    for stop in stop_strings:
        i = text.find(stop)
        if stop and i != -1:
            cut = min(cut, i)
    return text[:cut]


def parse_generation(text: str, *, finish_reason: str | None = None, prompt_opened_think: bool = False,
                     open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE,
                     stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> ParsedGeneration:
    """Parse raw generated text (the continuation only, not the prompt). See the module rules."""
    if not isinstance(text, str):
        raise DistthinkError(f"parse_generation expects a string, got {type(text).__name__}. Fix: decode the "
                             "generated ids first (tokenizer.decode(ids, skip_special_tokens=False)).")
    raw = text
    text = _cut_at_stop(text, stop_strings)

    splitter = re.compile("(" + re.escape(open_tag) + "|" + re.escape(close_tag) + ")")
    blocks: list[str] = []          # finished (or final unclosed) reasoning blocks
    outside: list[str] = []         # answer pieces, in order
    pending: list[str] = []         # outside text since the last block: an implied block if a stray close comes
    current: list[str] = []
    inside = prompt_opened_think
    text_before_first_block = False
    anomalies: list[str] = []
    for part in splitter.split(text):
        if part == open_tag:
            if inside:
                anomalies.append("nested_open_tag")
                continue
            if not blocks and any(p.strip() for p in pending):
                text_before_first_block = True
            outside.extend(pending)
            pending = []
            inside, current = True, []
        elif part == close_tag:
            if inside:
                blocks.append("".join(current))
            else:
                # Rule 3: an implied block from the end of the previous block (or the start) to here.
                if blocks:
                    anomalies.append("close_without_open")
                blocks.append("".join(pending))
                pending = []
            inside, current = False, []
        elif part:
            (current if inside else pending).append(part)
    unclosed = inside
    if unclosed:
        blocks.append("".join(current))
    outside.extend(pending)

    if not blocks:
        state: ThinkState = "absent"
    elif unclosed:
        state = "unclosed"
    elif all(not b.strip() for b in blocks):
        state = "empty"
    else:
        state = "closed"
    reasoning = None if not blocks else "\n\n".join(b.strip() for b in blocks if b.strip())
    answer = "\n".join(p.strip() for p in outside if p.strip())
    well_formed = (len(blocks) == 1 and state in ("closed", "empty") and not text_before_first_block
                   and not anomalies)
    return ParsedGeneration(reasoning=reasoning, answer=answer, raw=raw, finish_reason=finish_reason,
                            think_state=state, num_think_blocks=len(blocks), well_formed=well_formed,
                            anomalies=anomalies)


# ---------------------------------------------------------------- free think mode: close unfinished thoughts

@dataclass
class ClosedThoughts:
    """Output of :func:`close_thoughts`, one entry per sample.

    - ``sequences``: the thought ids ending with ``close_ids`` (+ ``after_close_ids``), ready for the gold
      description to be appended.
    - ``think_lengths``: thought tokens between the opener (if any) and ``</think>``, tags excluded.
    - ``closed_by_us``: True where the model produced no ``</think>`` and we appended it.
    """

    sequences: list[list[int]]
    think_lengths: list[int]
    closed_by_us: list[bool]

    @property
    def num_closed(self) -> int:
        return sum(self.closed_by_us)

    @property
    def fraction_closed(self) -> float:
        return self.num_closed / len(self.closed_by_us) if self.closed_by_us else 0.0


def _find(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    first = sub[0]
    for i, tok in enumerate(seq):
        if tok == first and seq[i:i + n] == sub:
            return i
    return -1


def close_thoughts(generated: Sequence[Sequence[int]], *, close_ids: Sequence[int],
                   after_close_ids: Sequence[int] = (), open_ids: Sequence[int] = (),
                   stop_ids: Iterable[int] = (), max_think_tokens: int | None = None) -> ClosedThoughts:
    """Keep each generated thought up to its first ``</think>``, or close it if the model did not.

    ``generated``: per sample, the generated continuation ids (a list of lists, or a (B, L) tensor's
    ``tolist()``), possibly right-padded. ``close_ids``: the ids of ``</think>`` (one id for Qwen3, several for
    tokenizers without a dedicated token). ``stop_ids``: eos/pad ids; the sequence is cut at the first one
    (a model that ends its turn inside the thought has an unclosed thought). ``after_close_ids``: appended
    after the close tag (Qwen3 renders ``"\\n\\n"`` there). ``max_think_tokens``: an unclosed thought longer
    than this is truncated before closing (the generator normally enforces it already).

    Anything the model generated after its ``</think>`` is dropped: in free mode the gold description replaces
    it. Runs once per regeneration on CPU lists, not in the training step, so a plain loop over samples is fine.
    """
    close_ids, after_close_ids, open_ids = list(close_ids), list(after_close_ids), list(open_ids)
    if not close_ids:
        raise DistthinkError("close_thoughts needs the ids of the close tag. Fix: pass "
                             "close_ids=tokenizer.encode('</think>', add_special_tokens=False).")
    stops = set(stop_ids)
    out, lengths, closed = [], [], []
    for ids in generated:
        ids = list(ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        ids = ids[:cut]
        start = len(open_ids) if open_ids and ids[: len(open_ids)] == open_ids else 0
        at = _find(ids, close_ids)
        if at >= 0:
            thought = ids[:at]
            closed.append(False)
        else:
            thought = ids
            if max_think_tokens is not None and len(thought) - start > max_think_tokens:
                thought = thought[: start + max_think_tokens]
            closed.append(True)
        lengths.append(len(thought) - start)
        out.append(thought + close_ids + after_close_ids)
    return ClosedThoughts(sequences=out, think_lengths=lengths, closed_by_us=closed)


def close_thought_text(text: str, *, close_tag: str = THINK_CLOSE, after_close: str = "\n\n",
                       stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> tuple[str, bool]:
    """String version of :func:`close_thoughts`: ``(text up to and including the first close tag, or the text
    with the tag appended, followed by after_close; closed_by_us)``."""
    text = _cut_at_stop(text, stop_strings)
    at = text.find(close_tag)
    if at >= 0:
        return text[:at] + close_tag + after_close, False
    return text.rstrip() + ("\n" if text.strip() else "") + close_tag + after_close, True
