"""<think> handling: inline-tag parsing and the thinking policies applied *before* the template renders.

Policies (ChatPolicy.think, see docs/thinking.md):
- "supervise": the reasoning the template renders is learned, with its <think>/</think> wrapper, at
               loss_weight * think_weight.
- "mask":      the reasoning stays in the context but is not learned (label -100, weight 0).
- "drop":      the reasoning is removed from the sample before rendering (reasoning_content and inline
               <think>...</think> blocks). Whatever the template still renders (e.g. Qwen3's empty think
               block on the last turn) is treated like rendered reasoning.
"""

from __future__ import annotations

import re
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_POLICIES = ("supervise", "mask", "drop")
_INTERNAL = ("loss_weight", "train", "dropped_empty")  # distthink's own keys, never shown to a template
_SPLIT = re.compile(r"(</?think>)")
_BLOCK = re.compile(r"<think>.*?</think>\s*", re.S)


def split_inline_think(content: str) -> list[tuple[str, str]]:
    """Split content into ("content"|"reasoning"|"tag", text) segments, in order.

    "<think>\\nR\\n</think>\\n\\nA" -> [("tag","<think>"), ("reasoning","\\nR\\n"), ("tag","</think>"),
    ("content","\\n\\nA")]. Empty segments are omitted. Tags are assumed balanced (schema validates it).
    """
    out: list[tuple[str, str]] = []
    inside = False
    for part in _SPLIT.split(content):
        if part == THINK_OPEN:
            inside = True
            out.append(("tag", part))
        elif part == THINK_CLOSE:
            inside = False
            out.append(("tag", part))
        elif part:
            out.append(("reasoning" if inside else "content", part))
    return out


def strip_inline_think(content: str) -> str:
    """Remove every <think>...</think> block (and the whitespace after it) from content."""
    return _BLOCK.sub("", content)


def inline_reasoning(reasoning: str, content: str) -> str:
    """The conventional inline form used when a template ignores reasoning_content (DeepSeek-R1 distills,
    Llama-based reasoning models): "<think>\\n{reasoning}\\n</think>\\n\\n{content}"."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"


def apply_think_policy(messages: list[dict[str, Any]], think: str, *,
                       template_renders_reasoning: bool) -> list[dict[str, Any]]:
    """Return new message dicts ready for the template (keys: role, content, reasoning_content?, and the
    internal loss_weight/train, which templates ignore).

    - drop: reasoning removed (both forms); an assistant turn left empty is no longer trained.
    - otherwise: reasoning_content is passed through; if the template does not render reasoning_content at
      all, it is inlined into content as a <think> block so it is never dropped silently.
    """
    out = []
    for m in messages:
        m = dict(m)
        r = m.get("reasoning_content")
        if m["role"] == "assistant":
            if think == "drop":
                m["reasoning_content"] = None
                m["content"] = strip_inline_think(m["content"])
                if not m["content"].strip():
                    m["train"] = False
                    m["dropped_empty"] = True
            elif r is not None and not template_renders_reasoning:
                if r.strip():
                    m["content"] = inline_reasoning(r, m["content"])
                m["reasoning_content"] = None
        out.append(m)
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The message dicts a chat template sees: the user's keys (role, content, tool_calls, name, ...) minus
    distthink's own (loss_weight, train); reasoning_content only when set (templates test `is defined`)."""
    out = []
    for m in messages:
        d = {k: v for k, v in m.items() if k not in _INTERNAL}
        d["role"], d["content"] = m["role"], m["content"]
        d.pop("reasoning_content", None)
        if m.get("reasoning_content") is not None:
            d["reasoning_content"] = m["reasoning_content"]
        out.append(d)
    return out
