"""encode_chat: the model's own chat template, rendered once, labelled exactly.

Method (template-agnostic, see docs/data.md "How labels are computed"):

1. Render the conversation once with the tokenizer's chat template: the *canonical* string C.
2. Render it a second time with every non-empty text field (content, reasoning_content, the parts of an
   inline <think> block) replaced by an opaque placeholder without whitespace. That *skeleton* S has the
   template's literal text (role headers, tags, end-of-turn tokens) between placeholders. Placeholders are
   only used to *find* spans, never tokenised, so they cannot leave residue.
3. Align S against C: every literal of S must appear verbatim in C, in order; what lies between two
   literals in C is the rendered field (whatever the template did to it: strip, trim, nothing). If a field
   is absent from S (Qwen3 dropping history reasoning), it is absent from C too and nothing is located.
   Alignment failure is an error, never a silent guess.
4. Per trained message, the learned character region runs from the end of the assistant header (the
   template's own generation prompt, found by a probe render) through the content and everything the
   template writes after it up to and including its end marker (found by probe renders, see _end_of_turn:
   the first special token after the content, or else a plain-text marker such as "### End" that ends at
   the last non-whitespace character before the next turn's header).
5. Tokenise C once with offsets; a token is learned iff it overlaps a learned character; its weight is the
   largest weight among the learned characters it overlaps. So turns are learned in full tokens at both
   ends: a token straddling the header/content boundary is learned (no content character is unlearned),
   and so is the token holding the end marker's last character, together with whatever it merges with
   (usually the separating whitespace, as in Qwen's ">" + newlines token; text of the next header is warned
   about). Tokens after it are not learned.

Why not the two common shortcuts: sentinel-wrapping the content changes what `strip`/`trim` in the template
removes (the markers shield the whitespace), and rendering prefixes messages[:i] and diffing breaks on
templates that are not prefix-stable (Qwen3 renders a turn's reasoning only while it is after the last user
query). tests/data/test_encode_chat_methods.py shows both failing where this method is exact.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from distthink.data.cache import Column
from distthink.data.schema import DEFAULT_INSTRUCTION_FORMAT, Sample, validate_messages
from distthink.data.thinking import (
    THINK_CLOSE,
    THINK_OPEN,
    THINK_POLICIES,
    apply_think_policy,
    split_inline_think,
    template_messages,
)
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

TRUNCATION_POLICIES = ("truncate_right", "truncate_left", "drop")

#: The meta keys an encoded sample of this module can carry, with their kinds: the encoded-data cache stores
#: them column by column (distthink/data/cache.py). A new meta key written here needs a line here.
META_COLUMNS = (
    Column("form", "category"), Column("source", "category"), Column("line", "int"), Column("turn", "int"),
    Column("trained_turns", "int"), Column("located_turns", "int"), Column("text_chars", "int"),
    Column("length_before_truncation", "int"), Column("truncated", "category"),
    Column("think_token_ranges", "pairs", "int32"), Column("reasoning_not_rendered", "bool"),
    Column("skipped_turns", "int"),
)


@dataclass
class ChatPolicy:
    """How a conversation becomes a training sample (config section `data.policy`, docs/data.md).

    think:                    "supervise" | "mask" | "drop" (docs/thinking.md).
    think_weight:             multiplies the weight of rendered reasoning tokens (think block) when supervised.
    enable_thinking:          passed to the template when not None; a sample's own `enable_thinking` wins.
    expand_turns:             one sample per trained assistant turn, rendered as seen at inference.
    max_length:               token budget per sample (None = unlimited).
    truncation:               "truncate_right" | "truncate_left" | "drop" for samples over max_length.
    allow_full_sequence_loss: disable the label audit (labels == input_ids everywhere is then allowed).
    instruction_format:       format string of the instruction/response form ({instruction}, {input}).
    template_kwargs:          extra keyword arguments for apply_chat_template (e.g. tools, custom flags).
    """

    think: str = "supervise"
    think_weight: float = 1.0
    enable_thinking: bool | None = None
    expand_turns: bool = False
    max_length: int | None = None
    truncation: str = "truncate_right"
    allow_full_sequence_loss: bool = False
    instruction_format: str = DEFAULT_INSTRUCTION_FORMAT
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.think not in THINK_POLICIES:
            raise ConfigError(f"think={self.think!r} is not a thinking policy. Fix: use one of {THINK_POLICIES}")
        tw = self.think_weight
        if isinstance(tw, bool) or not isinstance(tw, (int, float)) or not tw >= 0:
            raise ConfigError(f"think_weight={tw!r} must be a number >= 0. Fix: e.g. 1.0 (default) or 0.5")
        self.think_weight = float(tw)
        if self.enable_thinking is not None and not isinstance(self.enable_thinking, bool):
            raise ConfigError(f"enable_thinking={self.enable_thinking!r} must be true, false or null")
        if self.max_length is not None and (isinstance(self.max_length, bool)
                                            or not isinstance(self.max_length, int) or self.max_length < 1):
            raise ConfigError(f"max_length={self.max_length!r} must be a positive integer or null")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ConfigError(f"truncation={self.truncation!r} is unknown. Fix: use one of {TRUNCATION_POLICIES}")
        if not isinstance(self.template_kwargs, dict):
            raise ConfigError("template_kwargs must be a mapping of apply_chat_template keyword arguments")
        for k in ("enable_thinking", "tokenize", "add_generation_prompt", "conversation"):
            if k in self.template_kwargs:
                raise ConfigError(f"template_kwargs may not set '{k}'. Fix: "
                                  + ("use the policy's enable_thinking" if k == "enable_thinking"
                                     else "remove it; encode_chat controls it"))
        if not isinstance(self.instruction_format, str) or "{instruction}" not in self.instruction_format:
            raise ConfigError("instruction_format must be a string containing '{instruction}'")

    @classmethod
    def from_kwargs(cls, policy: "ChatPolicy | None" = None, **kwargs: Any) -> "ChatPolicy":
        """A policy from keyword arguments (unknown keys are a ConfigError), optionally overriding `policy`."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown policy option(s) {unknown}. Fix: use {sorted(names)}")
        base = {f.name: getattr(policy, f.name) for f in fields(cls)} if policy is not None else {}
        base.update(kwargs)
        return cls(**base)


# ----------------------------------------------------------------------------------------------------------
# Template probes (cached per template + kwargs): generation prompt, end-of-turn text, reasoning support.

@dataclass(frozen=True)
class TemplateInfo:
    gen_prompt: str          # what add_generation_prompt appends: the assistant header as seen at inference
    header: str              # gen_prompt cut before any <think> it opens
    eot: str                 # text that ends an assistant turn that another message follows, from right after
                             # its content through its end marker ("" if none; see _end_of_turn)
    eot_last: str            # the same for the final turn of a conversation (differs when e.g. eos is written
                             # only at the very end)
    renders_reasoning: bool  # does the template render reasoning_content on the last turn?


_PROBE_A = "7301946285"   # digits survive case-changing filters (upper, title, ...)
_PROBE_R = "5820193746"
_PROBE_U = "zqxjprobefollowup"
_INFO_CACHE: dict[tuple, TemplateInfo] = {}


def special_token_texts(tokenizer) -> list[str]:
    """Texts of all special tokens (including added tokens flagged special), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            texts.add(str(tok.content if hasattr(tok, "content") else tok))
    return sorted((t for t in texts if t), key=len, reverse=True)


def _render(tokenizer, messages, kwargs, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def template_info(tokenizer, kwargs: dict[str, Any]) -> TemplateInfo:
    key = (id(tokenizer), tokenizer.chat_template if isinstance(tokenizer.chat_template, str)
           else repr(tokenizer.chat_template), repr(sorted(kwargs.items(), key=lambda kv: kv[0])),
           tuple(special_token_texts(tokenizer)))
    info = _INFO_CACHE.get(key)
    if info is not None:
        return info
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template. Fix: use a "
                          "chat/instruct tokenizer, set tokenizer.chat_template, or use the prompt/completion or "
                          "instruction/response sample forms")
    user = [{"role": "user", "content": "zqxjprobequestion"}]
    try:
        base = _render(tokenizer, user, kwargs)
        with_gen = _render(tokenizer, user, kwargs, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that cannot render one user message is a config problem
        raise ConfigError(f"the chat template cannot render a single user message: {e}. Fix: check the "
                          "template or template_kwargs") from None
    gen = with_gen[len(base):] if with_gen.startswith(base) else ""
    header = gen.split(THINK_OPEN)[0] if THINK_OPEN in gen else gen
    try:
        full = _render(tokenizer, user + [{"role": "assistant", "content": _PROBE_A}], kwargs)
        probe = _render(tokenizer, user + [{"role": "assistant", "content": _PROBE_A,
                                            "reasoning_content": _PROBE_R}], kwargs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"the chat template cannot render a user/assistant exchange: {e}") from None
    eot, eot_last = _end_of_turn(tokenizer, kwargs, user, full)
    if not eot.strip() and not eot_last.strip():
        log.warning("the chat template writes nothing after an assistant turn's content (no end-of-turn "
                    "marker): the model will not learn to stop. Fix: use a template that ends assistant turns "
                    "with the eos/end-of-turn token or an end marker")
    else:
        text_markers = [m.strip() for m in (eot, eot_last)
                        if m.strip() and not any(sp in m for sp in special_token_texts(tokenizer))]
        if text_markers:
            log.info("the chat template ends assistant turns with the plain-text marker %r (no special token): it "
                     "is learned as part of each trained turn; stop generation on that text at inference",
                     text_markers[0])
    info = TemplateInfo(gen_prompt=gen, header=header, eot=eot, eot_last=eot_last,
                        renders_reasoning=_PROBE_R in probe)
    _INFO_CACHE[key] = info
    return info


def _end_of_turn(tokenizer, kwargs: dict[str, Any], user: list[dict[str, Any]], full: str) -> tuple[str, str]:
    """(eot, eot_last): what ends an assistant turn that another message follows, and what ends the final one.
    Each is the text the template writes after the assistant content, up to and including its end marker
    ("" when it writes none).

    The tail of a final turn is what `full` has after the assistant content. The tail of a turn that another
    message follows is where that and a render with a following user message agree (their common prefix), so
    that neither the next turn's header nor a footer written once at the end of a conversation counts. Within
    a tail, the marker ends at the first special token (<|im_end|>, <|eot_id|>, eos, ...) when there is one;
    otherwise it is a plain-text marker ("### End", or "</s>" that the tokenizer holds as ordinary text) and
    ends at the tail's last non-whitespace character. Whitespace after the marker separates turns."""
    j = full.rfind(_PROBE_A)
    if j < 0:
        return "", ""
    last = full[j + len(_PROBE_A):]
    try:
        follow = _render(tokenizer, user + [{"role": "assistant", "content": _PROBE_A},
                                            {"role": "user", "content": _PROBE_U}], kwargs)
    except Exception:  # noqa: BLE001 - a template refusing this exchange: the final turn's tail decides alone
        follow = ""
    a, u = follow.find(_PROBE_A), follow.rfind(_PROBE_U)
    middle = os.path.commonprefix([last, follow[a + len(_PROBE_A):u]]) if 0 <= a < u else last
    specials = special_token_texts(tokenizer)

    def marker(tail: str) -> str:
        hits = [(tail.find(sp), -len(sp), sp) for sp in specials if sp in tail]
        if hits:
            k, _, sp = min(hits)
            return tail[:k + len(sp)]
        return tail.rstrip()

    return marker(middle), marker(last)


# ----------------------------------------------------------------------------------------------------------
# Span location: placeholder skeleton aligned against the canonical render.

_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_PH_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass
class _Field:
    msg: int
    kind: str        # "content" | "reasoning"
    value: str


def _skeleton_messages(msgs: list[dict[str, Any]], keep: int = 0) -> tuple[list[dict[str, Any]], list[_Field]]:
    """Copy of the template messages with each non-empty text field replaced by a placeholder. Empty strings
    stay empty and inline <think> tags stay in place, so the template takes the same branches.

    keep > 0 (fallback pass): the first/last `keep` characters of each value stay around the placeholder, so
    templates that branch on `content.startswith(...)`/`endswith(...)` (Qwen3's <tool_response> check) or
    strip leading/trailing whitespace behave exactly as on the real text."""
    flds: list[_Field] = []

    def ph(i: int, kind: str, value: str) -> str:
        flds.append(_Field(i, kind, value))
        marker = f"{_PH_OPEN}{len(flds) - 1}{_PH_CLOSE}"
        if not keep:
            return marker
        a, b = _edges(value, keep)
        return a + marker + b

    out = []
    for i, m in enumerate(msgs):
        d = dict(m)
        d["content"] = "".join(text if kind == "tag" else ph(i, kind, text)
                               for kind, text in split_inline_think(m["content"]))
        r = m.get("reasoning_content")
        if r:
            d["reasoning_content"] = ph(i, "reasoning", r)
        out.append(d)
    return out, flds


def _edges(value: str, keep: int) -> tuple[str, str]:
    ka = min(keep, len(value) // 2)
    kb = min(keep, len(value) - ka)
    return value[:ka], value[len(value) - kb:]


def _candidates(v: str) -> list[str]:
    seen, out = set(), []
    for c in (v, v.strip(), v.strip("\n"), v.lstrip(), v.rstrip(), v.lstrip("\n"), v.rstrip("\n"),
              v.strip(" ")):
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _align(canonical: str, skeleton: str, flds: list[_Field], keep: int = 0,
           guard: tuple[str, ...] = ()) -> tuple[list[tuple[int, int, int]], int]:
    """([(field index, start, end)] in canonical order, number of weak matches), or raise ValueError when the
    literals do not match. A weak match is a field bracketed by the literals around it because none of the
    known renderings of its value (as is, stripped) fits; it must not swallow structure (`guard` texts such
    as special tokens or think tags that the value itself does not contain).

    With keep > 0 the kept edges of each value are cut off the neighbouring literals first (as the template
    rendered them: whole, or with leading/trailing whitespace stripped) and become part of the field again."""
    pieces = _PH_RE.split(skeleton)
    lits, ids = pieces[0::2], [int(x) for x in pieces[1::2]]
    cands: dict[int, list[str]] = {}
    for j, fid in enumerate(ids):
        v = flds[fid].value
        if not keep:
            cands[j] = _candidates(v)
            continue
        a, b = _edges(v, keep)
        a_r = next((c for c in (a, a.lstrip(), a.lstrip("\n"), a.lstrip(" "), "") if lits[j].endswith(c)), "")
        lits[j] = lits[j][:len(lits[j]) - len(a_r)]
        b_r = next((c for c in (b, b.rstrip(), b.rstrip("\n"), b.rstrip(" "), "") if lits[j + 1].startswith(c)), "")
        lits[j + 1] = lits[j + 1][len(b_r):]
        if (a.strip() and not a_r) or (b.strip() and not b_r):
            raise ValueError(f"the template changes the text of field {fid} (not only its whitespace)")
        cands[j] = [a_r + v[len(a):len(v) - len(b)] + b_r]
    if not canonical.startswith(lits[0]):
        raise ValueError("the render does not start like its skeleton")
    pos, n = len(lits[0]), len(canonical)
    spans, weak = [], 0
    for j, fid in enumerate(ids):
        nxt, last = lits[j + 1], j == len(ids) - 1
        end = None
        for cand in cands[j]:
            e = pos + len(cand)
            if canonical.startswith(cand, pos) and canonical.startswith(nxt, e) and (not last or e + len(nxt) == n):
                end = e
                break
        if end is None:  # the template transformed the field in an unknown way: bracket it by literals
            if last:
                end = n - len(nxt) if canonical.endswith(nxt) and n - len(nxt) >= pos else -1
            elif nxt:
                end = canonical.find(nxt, pos)
            else:
                end = -1  # two adjacent fields with nothing between them cannot be told apart
            if end < 0:
                raise ValueError(f"cannot locate field {fid} ({flds[fid].kind} of message {flds[fid].msg})")
            weak += 1
            got = canonical[pos:end]
            if any(g in got and g not in flds[fid].value for g in guard):
                raise ValueError(f"field {fid} ({flds[fid].kind} of message {flds[fid].msg}) would swallow "
                                 "template structure: the template took another branch on the real text")
        spans.append((fid, pos, end))
        pos = end + len(nxt)
    if not ids and canonical != lits[0]:
        raise ValueError("the render differs from its skeleton")
    if pos != n:
        raise ValueError("the render is longer than its skeleton")
    return spans, weak


def locate_fields(tokenizer, tmsgs: list[dict[str, Any]], kwargs: dict[str, Any], canonical: str,
                  guard: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE)):
    """(fields, spans) of every rendered text field of `tmsgs` in `canonical`.

    Pass 1 uses opaque placeholders. If a field needed a weak (bracketed) match or the alignment failed, pass 2
    uses placeholders that keep each value's edges (templates that branch on content.startswith(...)); its
    result wins when all its matches are strong. A weak-but-sane pass 1 (e.g. a template that upper-cases
    content) is used otherwise."""
    results, err = [], None
    for keep in (0, 16):
        skel_msgs, flds = _skeleton_messages(tmsgs, keep)
        try:
            skeleton = _render(tokenizer, skel_msgs, kwargs)
            spans, weak = _align(canonical, skeleton, flds, keep, guard)
        except Exception as e:  # noqa: BLE001 - ValueError from _align, or the template rejecting the skeleton
            err = e
            continue
        if weak == 0:
            return flds, spans
        results.append((flds, spans))
    if results:
        return results[0]
    raise ValueError(str(err))


# ----------------------------------------------------------------------------------------------------------
# Learned regions per message.

_WS_CLOSE = re.compile(r"\s*</think>\s*")


def _learned_regions(canonical: str, msgs: list[dict[str, Any]], flds: list[_Field], spans, info: TemplateInfo,
                     policy: ChatPolicy, specials: list[str]) -> tuple[list[tuple[int, int, float]], list, int, list]:
    """Character regions [(start, end, weight)] that are learned, the think regions [(start, end)], the
    number of trained messages that were located, and where each learned assistant end marker ends."""
    by_msg: dict[int, list[tuple[int, int, str]]] = {}
    counts: dict[int, int] = {}
    for fid, s, e in spans:
        counts[fid] = counts.get(fid, 0) + 1
        by_msg.setdefault(flds[fid].msg, []).append((s, e, flds[fid].kind))
    ends_sorted = sorted(e for _, _, e in spans)
    regions: list[tuple[int, int, float]] = []
    think_regions: list[tuple[int, int]] = []
    marker_ends: list[int] = []
    located = 0
    for i, m in enumerate(msgs):
        if not m.get("train") or m.get("loss_weight", 1.0) <= 0:
            continue
        sp = sorted(by_msg.get(i, []))
        if not sp:
            # A turn whose only output is non-text (tool calls, empty content) has no field to anchor on. A turn
            # whose reasoning the template dropped (Qwen3 history) is simply not in the sample.
            if m["role"] == "assistant" and not m["content"] and not m.get("reasoning_content"):
                reg = _fieldless_turn(canonical, i, by_msg, info)
                if reg is not None:
                    located += 1
                    regions.append((reg[0], reg[1], float(m.get("loss_weight", 1.0))))
            continue
        if any(counts[fid] > 1 for fid, _, _ in spans if flds[fid].msg == i):
            raise ValueError(f"the template renders message {i} more than once")
        located += 1
        first = sp[0][0]
        prev_end = max([e for e in ends_sorted if e <= first], default=0)
        start = first
        if m["role"] == "assistant":
            start = _output_start(canonical, prev_end, first, info, specials)
        reasoning = [(s, e) for s, e, k in sp if k == "reasoning"]
        r_end = max((e for _, e in reasoning), default=start)
        answer = [(s, e) for s, e, k in sp if k == "content" and s >= r_end]
        body_end = max(e for _, e, _ in sp)
        if not answer:  # reasoning only: the think block closes after it
            mt = _WS_CLOSE.match(canonical, body_end)
            if mt:
                body_end = mt.end()
        think_end = answer[0][0] if answer else body_end
        has_think = bool(reasoning) or THINK_OPEN in canonical[start:think_end]
        if has_think and answer:
            # The whitespace between </think> and the answer belongs to the think block, whether the template
            # writes it as a literal (Qwen3) or it is part of inline content (<think>..</think>\n\nanswer).
            a0, a1 = answer[0]
            text = canonical[a0:a1]
            think_end = a0 + (len(text) - len(text.lstrip()))
        end = _turn_end(canonical, body_end, i, m["role"], spans, flds, info)
        if m["role"] == "assistant" and end > body_end:
            marker_ends.append(end)
        w = float(m.get("loss_weight", 1.0))
        if has_think and think_end > start:
            think_regions.append((start, think_end))
            if policy.think != "mask" and w * policy.think_weight > 0:
                regions.append((start, think_end, w * policy.think_weight))
            if end > think_end:
                regions.append((think_end, end, w))
        elif end > start:
            regions.append((start, end, w))
    return regions, think_regions, located, marker_ends


def _fieldless_turn(c: str, msg: int, by_msg: dict, info: TemplateInfo) -> tuple[int, int] | None:
    """Region of an assistant turn that has no text field in the render (empty content, e.g. only tool
    calls): between the neighbouring messages' fields there must be exactly one assistant header, followed by
    an end-of-turn token. Otherwise the turn cannot be placed without guessing and is left unlearned."""
    lo = max((e for j, sp in by_msg.items() if j < msg for _, e, _ in sp), default=0)
    hi = min((s for j, sp in by_msg.items() if j > msg for s, _, _ in sp), default=len(c))
    gap, core = c[lo:hi], (info.eot if hi < len(c) else info.eot_last).strip()
    for header in (info.gen_prompt, info.header):
        if header and core and gap.count(header) == 1:
            start = lo + gap.index(header) + len(header)
            j = c.find(core, start, hi)
            return (start, j + len(core)) if j >= 0 else None
    return None


def _turn_end(c: str, body_end: int, msg: int, role: str, spans, flds: list[_Field], info: TemplateInfo) -> int:
    """End of a trained message's learned region: through its end-of-turn marker (a special token or
    plain text, see _end_of_turn).

    Assistant: everything the template writes after the content up to and including the end marker is what the
    model generates before stopping (e.g. Qwen3's rendered tool calls, the blank line before "### End"), so it
    is learned, as long as that stays before the next message's text and does not contain an assistant header.
    The final turn of the render uses the final-turn marker. Other roles (unmask): only an end marker that
    directly follows the content (whitespace allowed)."""
    nxt = min((s for fid, s, _ in spans if s >= body_end and flds[fid].msg != msg), default=len(c))
    core = (info.eot if nxt < len(c) or role != "assistant" else info.eot_last).strip()
    if not core:
        return body_end
    if role != "assistant":
        k = len(c[body_end:]) - len(c[body_end:].lstrip())
        return body_end + k + len(core) if c.startswith(core, body_end + k) else body_end
    j = c.find(core, body_end, nxt)
    if j < 0:
        return body_end
    gap = c[body_end:j]
    if (info.gen_prompt and info.gen_prompt in gap) or (info.header.strip() and info.header.strip() in gap):
        return body_end
    return j + len(core)


def _output_start(c: str, lo: int, hi: int, info: TemplateInfo, specials: list[str]) -> int:
    """Where the assistant's own output begins: right after the template's generation prompt (what the model
    is given at inference), searched in the literal gap before the turn's first field."""
    gap = c[lo:hi]
    for marker in (info.gen_prompt, info.header):
        if marker:
            j = gap.rfind(marker)
            if j >= 0:
                return lo + j + len(marker)
    # No recognisable header: start at a <think> opening the turn, else at the first field.
    k = gap.rfind(THINK_OPEN)
    if k >= 0 and not any(sp in gap[k:] for sp in specials):
        return lo + k
    return hi


# ----------------------------------------------------------------------------------------------------------
# Tokenise + label.

def _tokenize_with_offsets(tokenizer, text: str, add_special_tokens: bool):
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, offs


def _label(ids: list[int], offs: np.ndarray, regions: list[tuple[int, int, float]]):
    """labels/weights from char regions through token offsets (overlap rule, max weight)."""
    n = len(ids)
    weights = np.zeros(n, dtype=np.float64)
    learned = np.zeros(n, dtype=bool)
    starts, ends = offs[:, 0], offs[:, 1]
    nonempty = ends > starts
    # Offsets of sequential tokens are non-decreasing; searchsorted relies on it.
    for s, e, w in regions:
        if e <= s:
            continue
        i0 = int(np.searchsorted(ends, s, side="right"))
        i1 = int(np.searchsorted(starts, e, side="left"))
        if i1 <= i0:
            continue
        sel = slice(i0, i1)
        mask = nonempty[sel]
        learned[sel] |= mask
        weights[sel] = np.where(mask, np.maximum(weights[sel], w), weights[sel])
    ids_arr = np.asarray(ids, dtype=np.int64)
    labels = np.where(learned, ids_arr, IGNORE_INDEX)
    return labels, np.where(learned, weights, 0.0)


def _token_ranges(offs: np.ndarray, char_regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    starts, ends = offs[:, 0], offs[:, 1]
    for s, e in char_regions:
        i0 = int(np.searchsorted(ends, s, side="right"))
        i1 = int(np.searchsorted(starts, e, side="left"))
        if i1 > i0:
            out.append((i0, i1))
    return out


def _check_offsets(offs: np.ndarray, n_chars: int) -> bool:
    if len(offs) == 0:
        return n_chars == 0
    s, e = offs[:, 0], offs[:, 1]
    return (s[0] == 0 and e.max() == n_chars and bool(np.all(s[1:] >= s[:-1])) and bool(np.all(e[1:] >= e[:-1]))
            and bool(np.all(s[1:] <= np.maximum.accumulate(e)[:-1])))


# ----------------------------------------------------------------------------------------------------------
# Public API.

def _kwargs_for(policy: ChatPolicy, enable_thinking: bool | None) -> dict[str, Any]:
    kwargs = dict(policy.template_kwargs)
    et = enable_thinking if enable_thinking is not None else policy.enable_thinking
    if et is not None:
        kwargs["enable_thinking"] = et
    return kwargs


def _normalizer(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None)
    if norm is None:
        return None
    form = type(norm).__name__
    if form in ("NFC", "NFKC", "NFD", "NFKD"):
        # Fast path: most text is already in normal form (checked in C); only the rest goes through tokenizers.
        def normalize(text: str) -> str:
            return text if unicodedata.is_normalized(form, text) else norm.normalize_str(text)
        return normalize
    return norm.normalize_str


def normalize_texts(tokenizer, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply the tokenizer's own normalizer (Qwen: NFC) to message texts before rendering, so that the render
    is exactly what the tokenizer sees and decode(input_ids) reproduces it. Without a normalizer: unchanged."""
    norm = _normalizer(tokenizer)
    if norm is None:
        return messages
    out = []
    for m in messages:
        d = dict(m)
        d["content"] = norm(m["content"])
        if m.get("reasoning_content"):
            d["reasoning_content"] = norm(m["reasoning_content"])
        out.append(d)
    return out


def prepare_messages(tokenizer, messages: list[dict[str, Any]], policy: ChatPolicy,
                     enable_thinking: bool | None = None) -> list[dict[str, Any]]:
    """The exact message list handed to the chat template for `messages` (validated + normalised) under
    `policy`: think=drop removes reasoning; reasoning of a template that cannot render reasoning_content is
    inlined as a <think> block. `apply_chat_template(prepare_messages(...), tokenize=False, **kwargs)` is the
    canonical render that encode_chat's input_ids decode to."""
    info = template_info(tokenizer, _kwargs_for(policy, enable_thinking))
    messages = validate_messages(messages)
    msgs = apply_think_policy(normalize_texts(tokenizer, messages), policy.think,
                              template_renders_reasoning=info.renders_reasoning)
    return template_messages(msgs)


def _fail(reason: str, msg: str, fix: str, sample: Sample | None) -> DataError:
    return DataError(msg, source=sample.source if sample else None, line=sample.line if sample else None,
                     field="messages", fix=fix, reason=reason)


def _finish(ids, labels, weights, think_tok, policy: ChatPolicy, meta: dict, sample: Sample | None):
    n = len(ids)
    meta = dict(meta)
    meta["length_before_truncation"] = n
    if policy.max_length is not None and n > policy.max_length:
        if policy.truncation == "drop":
            raise _fail("too_long", f"sample has {n} tokens > max_length={policy.max_length}",
                        "raise max_length or use truncation: truncate_right/truncate_left", sample)
        L = policy.max_length
        if policy.truncation == "truncate_right":
            sl, off = slice(0, L), 0
        else:
            sl, off = slice(n - L, n), n - L
        ids, labels, weights = ids[sl], labels[sl], weights[sl]
        think_tok = [(max(a - off, 0), min(b - off, L)) for a, b in think_tok if min(b - off, L) > max(a - off, 0)]
        meta["truncated"] = policy.truncation
    if not np.any(labels != IGNORE_INDEX):
        raise _fail("no_learned_tokens",
                    "no token of this sample is learned" + (" after truncation" if meta.get("truncated") else ""),
                    "raise max_length, use truncate_left, or check loss_weight/think settings", sample)
    meta["think_token_ranges"] = think_tok
    return EncodedSample(input_ids=np.asarray(ids, dtype=np.int64).tolist(),
                         labels=np.asarray(labels, dtype=np.int64).tolist(),
                         loss_weights=np.asarray(weights, dtype=np.float64).tolist(), meta=meta)


def _encode_messages(tokenizer, msgs: list[dict[str, Any]], policy: ChatPolicy, enable_thinking: bool | None,
                     sample: Sample | None, meta: dict) -> EncodedSample:
    kwargs = _kwargs_for(policy, enable_thinking)
    info = template_info(tokenizer, kwargs)
    specials = special_token_texts(tokenizer)
    prepared = apply_think_policy(normalize_texts(tokenizer, msgs), policy.think,
                                  template_renders_reasoning=info.renders_reasoning)
    if not any(m.get("train") and m.get("loss_weight", 1.0) > 0 for m in prepared):
        raise _fail("no_learned_tokens", "no trained turn is left (reasoning-only turns under think=drop?)",
                    "use think: supervise/mask for reasoning-only turns or add content", sample)
    tmsgs = template_messages(prepared)
    try:
        canonical = _render(tokenizer, tmsgs, kwargs)
    except Exception as e:  # jinja TemplateError / the template's own raise_exception
        raise _fail("template_error", f"the chat template raised: {e}",
                    "fix the conversation so the model's template accepts it (role order, system position)",
                    sample) from None
    if _PH_OPEN in canonical or _PH_CLOSE in canonical:
        raise _fail("template_error", "text contains reserved private-use characters U+E000/U+E001",
                    "remove them from the sample", sample)
    try:
        flds, spans = locate_fields(tokenizer, tmsgs, kwargs, canonical, (THINK_OPEN, THINK_CLOSE, *specials))
        regions, think_regions, located, marker_ends = _learned_regions(canonical, prepared, flds, spans, info,
                                                                       policy, specials)
    except ValueError as e:
        raise _fail("template_unaligned", f"cannot map the chat template's render back to the messages: {e}",
                    "the template alters message text in a way distthink cannot follow; please report it "
                    "with the template", sample) from None
    ids, offs = _tokenize_with_offsets(tokenizer, canonical, add_special_tokens=False)
    if not _check_offsets(offs, len(canonical)):
        raise _fail("tokenizer_offsets", "the tokenizer's offset mapping does not cover the text",
                    "use a fast tokenizer with trim_offsets=false", sample)
    labels, weights = _label(ids, offs, regions)
    _warn_marker_merged(tokenizer, canonical, offs, marker_ends)
    if id(tokenizer) not in _WARNED_ROUNDTRIP and tokenizer.decode(ids) != canonical:
        # Some (legacy SentencePiece) tokenizers do not reproduce text around special tokens on decode. The ids
        # are still those of the canonical render (what apply_chat_template(tokenize=True) gives), so labels
        # stay exact; only the text shown by `distthink inspect` may differ in whitespace.
        _WARNED_ROUNDTRIP.add(id(tokenizer))
        log.warning("%s does not decode its ids back to the rendered text exactly (whitespace around special "
                    "tokens); labels follow the tokenisation of the render", getattr(tokenizer, "name_or_path", "tokenizer"))
    trained = sum(1 for m in prepared if m.get("train") and m.get("loss_weight", 1.0) > 0)
    meta = dict(meta, trained_turns=trained, located_turns=located, text_chars=len(canonical))
    if policy.think != "drop" and _final_reasoning_lost(msgs, prepared, flds, spans):
        meta["reasoning_not_rendered"] = True
        key = id(tokenizer)
        if key not in _WARNED_REASONING:
            _WARNED_REASONING.add(key)
            log.warning("the chat template of %s does not render the reasoning of the final assistant turn "
                        "(e.g. DeepSeek-R1's own template cuts everything before </think>): that reasoning is "
                        "NOT trained. Counted per sample in the dataset report (reasoning_not_rendered). Fix: use "
                        "a template that renders reasoning on the last turn, or think: drop to make it explicit",
                        getattr(tokenizer, "name_or_path", "the tokenizer"))
    return _finish(np.asarray(ids), labels, weights, _token_ranges(offs, think_regions), policy, meta, sample)


_WARNED_REASONING: set[int] = set()
_WARNED_ROUNDTRIP: set[int] = set()
_WARNED_MERGED: set[int] = set()


def _warn_marker_merged(tokenizer, canonical: str, offs: np.ndarray, marker_ends: list[int]) -> None:
    """Warn (once per tokenizer) when the token holding the last character of an end marker also holds text
    of what follows that is not whitespace (the next turn's header): that token is learned, because without
    it the marker is never written, so the model also learns to begin the next header. Tokenizers that split
    words from punctuation and whitespace (byte-level BPE with a pre-tokenizer: Qwen, Llama-3, GPT-2) never
    do this; it takes a template without any separator after its marker and a tokenizer that merges across."""
    if id(tokenizer) in _WARNED_MERGED:
        return
    for e in marker_ends:
        t = int(np.searchsorted(offs[:, 1], e, side="left"))  # the first token ending at or after e holds e - 1
        if t < len(offs) and offs[t, 0] < e < offs[t, 1] and canonical[e:offs[t, 1]].strip():
            _WARNED_MERGED.add(id(tokenizer))
            log.warning("%s writes the end of an assistant turn's end marker and the start of the next turn (%r) "
                        "as one token, %r: it is learned so that the marker is, and the model learns to begin "
                        "the next turn's header too. Fix: a template with whitespace or a special token after "
                        "its end marker", getattr(tokenizer, "name_or_path", "the tokenizer"),
                        canonical[e:offs[t, 1]], canonical[offs[t, 0]:offs[t, 1]])
            return


def _final_reasoning_lost(original, prepared, flds: list[_Field], spans) -> bool:
    """True when the last trained assistant turn carried reasoning but none of it appears in the render."""
    last = max((i for i, m in enumerate(prepared) if m["role"] == "assistant" and m.get("train")), default=None)
    if last is None:
        return False
    m = original[last]
    had = bool((m.get("reasoning_content") or "").strip()) or THINK_CLOSE in m["content"]
    rendered = any(flds[fid].msg == last and flds[fid].kind == "reasoning" for fid, _, _ in spans)
    return had and not rendered


def _encode_text(tokenizer, sample: Sample, policy: ChatPolicy) -> EncodedSample:
    eos = tokenizer.eos_token or ""
    completion = sample.completion if (not eos or sample.completion.endswith(eos)) else sample.completion + eos
    norm = _normalizer(tokenizer) or (lambda text: text)
    prompt, completion = norm(sample.prompt), norm(completion)
    text = prompt + completion
    ids, offs = _tokenize_with_offsets(tokenizer, text, add_special_tokens=True)
    labels, weights = _label(ids, offs, [(len(prompt), len(text), 1.0)])
    meta = {"form": sample.meta.get("form", "prompt_completion"), "source": sample.source, "line": sample.line}
    return _finish(np.asarray(ids), labels, weights, [], policy, meta, sample)


def expand_turn_messages(msgs: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
    """[(k, messages[:k+1] with only turn k (and the untrained-elsewhere non-assistant messages since the
    previous trained assistant turn, under unmask) marked trained)] for each trained assistant turn k."""
    out = []
    prev = -1
    for k, m in enumerate(msgs):
        if m["role"] != "assistant" or not m.get("train") or m.get("loss_weight", 1.0) <= 0:
            continue
        sub = []
        for j, mj in enumerate(msgs[:k + 1]):
            d = dict(mj)
            d["train"] = bool(mj.get("train")) and (j == k or (mj["role"] != "assistant" and j > prev))
            sub.append(d)
        out.append((k, sub))
        prev = k
    return out


@dataclass
class EncodeResult:
    samples: list[EncodedSample]
    skipped: list[DataError]


def encode_sample(tokenizer, sample: Sample, policy: ChatPolicy) -> EncodeResult:
    """Encode one validated `Sample` into 1 (or, with expand_turns, several) EncodedSamples. Per-turn
    failures under expand_turns are returned in `skipped`; a single-sample failure raises DataError."""
    if sample.kind == "text":
        return EncodeResult([_encode_text(tokenizer, sample, policy)], [])
    base_meta = {"form": "messages", "source": sample.source, "line": sample.line}
    if not policy.expand_turns:
        return EncodeResult([_encode_messages(tokenizer, sample.messages, policy, sample.enable_thinking, sample,
                                              base_meta)], [])
    out, skipped = [], []
    for k, sub in expand_turn_messages(sample.messages):
        try:
            out.append(_encode_messages(tokenizer, sub, policy, sample.enable_thinking, sample,
                                        dict(base_meta, turn=k)))
        except DataError as e:
            skipped.append(e)
    if not out and skipped:
        raise skipped[0]
    return EncodeResult(out, skipped)


def encode_chat(tokenizer, messages: list[dict[str, Any]], *, policy: ChatPolicy | None = None,
                unmask: bool = False, source: str | None = None, line: int | None = None,
                **policy_kwargs: Any) -> EncodedSample | list[EncodedSample]:
    """Render `messages` with `tokenizer`'s chat template and label it exactly.

    Returns an EncodedSample (input_ids, labels, loss_weights: lists of length T; labels unshifted, -100
    where not learned; loss_weights 0 there) or, with expand_turns=True, a list of them (one per trained
    assistant turn; turns left with nothing to learn are omitted and counted in `meta['skipped_turns']`).

    Policy options come as keywords (see ChatPolicy) or `policy=`. `unmask=True` trains every non-system
    role. Invalid messages raise DataError naming source/line/field; a sample with nothing learned (after
    truncation) raises DataError(reason="no_learned_tokens").

    Guarantee: tokenizer.decode(input_ids) == tokenizer.apply_chat_template(prepare_messages(...),
    tokenize=False, **template_kwargs); prepare_messages returns `messages` unchanged except for think=drop and
    templates that ignore reasoning_content (docs/thinking.md).
    """
    policy = ChatPolicy.from_kwargs(policy, **policy_kwargs)
    msgs = validate_messages(messages, source=source, line=line, unmask=unmask)
    sample = Sample("messages", messages=msgs, unmask=unmask, source=source, line=line)
    res = encode_sample(tokenizer, sample, policy)
    if policy.expand_turns:
        for s in res.samples:
            s.meta["skipped_turns"] = len(res.skipped)
        return res.samples
    return res.samples[0]
