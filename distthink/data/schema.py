"""Sample formats and their validation.

Three forms are accepted (one per record; see docs/data.md):

- messages:              {"messages": [{role, content, reasoning_content?, loss_weight?}, ...],
                          "unmask"?: bool, "enable_thinking"?: bool}
- prompt / completion:   {"prompt": str | messages, "completion": str | messages}
- instruction / response:{"instruction": str, "input"?: str, "response": str}

`validate_record` turns a raw record into a `Sample` or raises `DataError` naming source, line, field, the
fix, and a short stable `reason` key used by skip-and-count reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from distthink.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# Keys distthink interprets; any other message key is handed to the chat template as is.
_OWN_KEYS = ("role", "content", "reasoning_content", "loss_weight", "train")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_TAG = re.compile(r"</?think>")

# Stable reason keys (documented in docs/data.md).
REASONS = {
    "not_an_object": "the record is not a JSON object",
    "unknown_form": "the record has none of messages / prompt+completion / instruction+response",
    "empty_conversation": "messages is missing or empty",
    "bad_message": "a message is not an object or lacks a role",
    "unknown_role": "a message has a role outside system/user/assistant/tool",
    "non_string_content": "content is not a string",
    "non_string_reasoning": "reasoning_content is not a string",
    "reasoning_on_non_assistant": "reasoning_content on a non-assistant message",
    "empty_assistant": "an assistant turn has neither content nor reasoning",
    "unbalanced_think": "inline <think>/</think> tags in content are unbalanced",
    "bad_loss_weight": "loss_weight is not a non-negative number",
    "bad_flag": "unmask / enable_thinking is not a boolean",
    "no_trainable_turn": "nothing in the sample would be trained",
}


@dataclass
class Sample:
    """A validated sample in one of three kinds.

    kind == "messages": `messages` holds normalised dicts {role, content, reasoning_content (str|None),
    loss_weight (float), train (bool)}; `train` says whether the message is supervised (assistant turns by
    default, every non-system role with unmask, only the completion part for conversational
    prompt/completion).
    kind == "text": raw text pair, `prompt` is context and `completion` is learned (plus eos).
    """

    kind: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    enable_thinking: bool | None = None
    unmask: bool = False
    source: str | None = None
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _err(msg: str, reason: str, fix: str, source, line, fld) -> DataError:
    return DataError(msg, source=source, line=line, field=fld, fix=fix, reason=reason)


def check_think_balance(text: str) -> bool:
    """True when inline <think>/</think> tags are properly paired and not nested."""
    depth = 0
    for m in _THINK_TAG.finditer(text):
        if m.group(0) == THINK_OPEN:
            if depth:
                return False
            depth = 1
        else:
            if not depth:
                return False
            depth = 0
    return depth == 0


def validate_messages(messages: Any, *, source: str | None = None, line: int | None = None,
                      unmask: bool = False, field_prefix: str = "messages",
                      train_assistant: bool = True) -> list[dict[str, Any]]:
    """Validate and normalise a message list. Raises DataError (see REASONS)."""
    if not isinstance(messages, list) or not messages:
        raise _err("the conversation is empty", "empty_conversation",
                   "give a non-empty list of {role, content} messages", source, line, field_prefix)
    out = []
    for i, m in enumerate(messages):
        where = f"{field_prefix}[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise _err("message is not an object with a 'role'", "bad_message",
                       "write each message as {\"role\": ..., \"content\": ...}", source, line, where)
        role = m["role"]
        if role not in ROLES:
            raise _err(f"unknown role {role!r}", "unknown_role",
                       f"use one of {', '.join(ROLES)} (map e.g. 'human'->'user', 'gpt'->'assistant')",
                       source, line, f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _err(f"content must be a string, got {type(content).__name__}", "non_string_content",
                       "convert content to plain text (multimodal/list content is not supported)",
                       source, line, f"{where}.content")
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise _err(f"reasoning_content on a {role!r} message", "reasoning_on_non_assistant",
                           "move the reasoning to an assistant turn or remove it", source, line,
                           f"{where}.reasoning_content")
            if not isinstance(reasoning, str):
                raise _err(f"reasoning_content must be a string, got {type(reasoning).__name__}",
                           "non_string_reasoning", "write the reasoning as one string", source, line,
                           f"{where}.reasoning_content")
            if THINK_OPEN in reasoning or THINK_CLOSE in reasoning:
                raise _err("reasoning_content contains <think>/</think> tags", "unbalanced_think",
                           "give the bare reasoning text; the chat template adds the tags", source, line,
                           f"{where}.reasoning_content")
        if not check_think_balance(content):
            raise _err("inline <think>/</think> tags are unbalanced", "unbalanced_think",
                       "close every <think> with </think> (or move the reasoning to reasoning_content)",
                       source, line, f"{where}.content")
        if role == "assistant" and not content.strip() and not (reasoning or "").strip() and not m.get("tool_calls"):
            raise _err("assistant turn has neither content nor reasoning", "empty_assistant",
                       "fill in the assistant's answer or remove the turn", source, line, where)
        weight = m.get("loss_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise _err(f"loss_weight must be a number >= 0, got {weight!r}", "bad_loss_weight",
                       "use e.g. 1.0 (default), 0.5 to down-weight, 0 to not train this turn", source, line,
                       f"{where}.loss_weight")
        train = role == "assistant" and train_assistant or (unmask and role != "system")
        # Other keys (tool_calls, name, tool_call_id, ...) are passed to the chat template unchanged.
        extra = {k: v for k, v in m.items() if k not in _OWN_KEYS}
        out.append({**extra, "role": role, "content": content, "reasoning_content": reasoning,
                    "loss_weight": float(weight), "train": bool(train)})
    return out


def _flag(record: dict, name: str, source, line, default):
    v = record.get(name, default)
    if v is None or isinstance(v, bool):
        return v
    raise _err(f"{name} must be true or false, got {v!r}", "bad_flag", f"set {name} to true/false",
               source, line, name)


def validate_record(record: Any, *, source: str | None = None, line: int | None = None,
                    instruction_format: str | None = None) -> Sample:
    """Validate one raw record (any of the three forms) into a `Sample`."""
    if not isinstance(record, dict):
        raise _err(f"record is a {type(record).__name__}, not an object", "not_an_object",
                   "write one JSON object per line", source, line, None)
    enable_thinking = _flag(record, "enable_thinking", source, line, None)
    unmask = bool(_flag(record, "unmask", source, line, False))
    if "messages" in record:
        msgs = validate_messages(record["messages"], source=source, line=line, unmask=unmask)
        _require_trainable(msgs, source, line)
        return Sample("messages", messages=msgs, enable_thinking=enable_thinking, unmask=unmask,
                      source=source, line=line)
    if "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if isinstance(p, list) and isinstance(c, list):
            msgs = (validate_messages(p, source=source, line=line, field_prefix="prompt",
                                      train_assistant=False, unmask=False)
                    + validate_messages(c, source=source, line=line, field_prefix="completion",
                                        unmask=unmask))
            _require_trainable(msgs, source, line)
            return Sample("messages", messages=msgs, enable_thinking=enable_thinking, unmask=unmask,
                          source=source, line=line)
        for name, v in (("prompt", p), ("completion", c)):
            if not isinstance(v, str):
                raise _err(f"{name} must be a string (or both prompt and completion message lists)",
                           "non_string_content", f"make {name} a string", source, line, name)
        if not c:
            raise _err("completion is empty", "empty_assistant", "give a non-empty completion", source,
                       line, "completion")
        return Sample("text", prompt=p, completion=c, source=source, line=line)
    if "instruction" in record and ("response" in record or "output" in record):
        resp_field = "response" if "response" in record else "output"
        fields = {k: record.get(k, "") for k in ("instruction", "input")}
        fields["input"] = fields["input"] or ""
        for name, v in list(fields.items()) + [(resp_field, record[resp_field])]:
            if not isinstance(v, str):
                raise _err(f"{name} must be a string, got {type(v).__name__}", "non_string_content",
                           f"make {name} a string", source, line, name)
        if not record[resp_field]:
            raise _err("response is empty", "empty_assistant", "give a non-empty response", source, line,
                       resp_field)
        fmt = instruction_format or DEFAULT_INSTRUCTION_FORMAT
        if fields["input"] and "{input}" not in fmt:
            # Never drop the input silently: append it to the instruction when the format has no slot.
            fields["instruction"] = fields["instruction"] + "\n\n" + fields["input"]
        try:
            prompt = fmt.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"instruction_format {fmt!r} cannot be filled: {e}", source=source, line=line,
                            field="instruction_format", reason="bad_instruction_format",
                            fix="use only {instruction} and {input} placeholders") from None
        return Sample("text", prompt=prompt, completion=record[resp_field], source=source, line=line,
                      meta={"form": "instruction"})
    raise _err(f"record has none of the accepted forms (keys: {sorted(record)[:8]})", "unknown_form",
               "use 'messages', or 'prompt'+'completion', or 'instruction'+'response'", source, line, None)


def _require_trainable(msgs, source, line) -> None:
    if not any(m["train"] and m["loss_weight"] > 0 for m in msgs):
        raise _err("no message would be trained (no assistant turn with loss_weight > 0)",
                   "no_trainable_turn", "add an assistant turn or set unmask: true", source, line, "messages")


DEFAULT_INSTRUCTION_FORMAT = "### Instruction:\n{instruction}\n\n### Response:\n"
