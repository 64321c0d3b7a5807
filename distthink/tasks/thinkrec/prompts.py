"""ThinkRec prompts: templates with placeholders, rendered into chat messages.

Two kinds of placeholder live in a template:

- *text fields*, replaced by text when a prompt is rendered: ``<HisItemList>`` (the user's history, one
  line per item with its feedback) and ``<TargetItemTitle>``;
- *id tokens*, which stay in the prompt as dedicated added special tokens and whose embedding rows are
  replaced by projected CF vectors before the decoder runs (distthink/models/inject.py): ``<UserID>``,
  ``<TargetItemID>`` and one ``<ItemID>`` per history item (written by the ``<HisItemList>`` field when
  ids are on).

``mode="text"`` (stage 1) renders no id token at all; ``mode="ids"`` (stage 2/3) renders them. The
answer is ``"Yes"``/``"No"`` for a label-only sample and the stored ``reason`` (which starts with
``"Yes. because"``/``"No. because"``) for a reasoning sample.

Rendering happens once, at dataset construction (never string surgery inside the training step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from distthink.errors import ConfigError, DataError

USER_ID = "<UserID>"
ITEM_ID = "<ItemID>"
TARGET_ITEM_ID = "<TargetItemID>"
HIS_ITEM_LIST = "<HisItemList>"
TARGET_ITEM_TITLE = "<TargetItemTitle>"

#: Placeholders that become added special tokens (always added, so the vocabulary is the same in every stage).
ID_TOKENS = (USER_ID, ITEM_ID, TARGET_ITEM_ID)

TEXT_TEMPLATE = (
    "A user rated these movies (most recent last):\n<HisItemList>\n"
    "Will the user enjoy the movie \"<TargetItemTitle>\"? Answer Yes or No."
)
IDS_TEMPLATE = (
    "User <UserID> rated these movies (most recent last):\n<HisItemList>\n"
    "Will the user enjoy the movie \"<TargetItemTitle>\" <TargetItemID>? Answer Yes or No."
)
TEMPLATES = {"text": TEXT_TEMPLATE, "ids": IDS_TEMPLATE}


@dataclass
class RenderedPrompt:
    """One rendered prompt. ``history_ids`` lists the item ids whose ``<ItemID>`` tokens appear, in order."""

    messages: list[dict]
    user_id: int
    item_id: int
    history_ids: list[int]


def check_template(template: str, mode: str) -> None:
    """Refuse templates that cannot be rendered in ``mode`` (ConfigError naming the fix)."""
    if mode not in TEMPLATES:
        raise ConfigError(f"task.options.prompt_mode={mode!r} is unknown. Fix: use `text` or `ids`")
    if TARGET_ITEM_TITLE not in template and TARGET_ITEM_ID not in template:
        raise ConfigError("task.options.template names no target item. Fix: include <TargetItemTitle> "
                          "and/or <TargetItemID>")
    if mode == "text":
        bad = [t for t in (USER_ID, TARGET_ITEM_ID, ITEM_ID) if t in template]
        if bad:
            raise ConfigError(f"task.options.template contains id placeholders {bad} but prompt_mode=text. "
                              "Fix: prompt_mode=ids (needs task.options.cf_export), or drop them")
    if ITEM_ID in template:
        raise ConfigError("task.options.template contains <ItemID> directly. Fix: per-history <ItemID> tokens are "
                          "written by the <HisItemList> field; use that")


def history_lines(titles: Sequence[str], labels: Sequence[int], with_ids: bool) -> str:
    """The ``<HisItemList>`` text: one line per history item, ``<ItemID>`` after each title when ids are on."""
    if len(titles) == 0:
        return "(no history)"
    tag = f" {ITEM_ID}" if with_ids else ""
    return "\n".join(f"\"{t}\"{tag} ({'liked' if int(y) else 'disliked'})" for t, y in zip(titles, labels))


def render(row: dict, *, template: str, mode: str, answer: str, source: str | None = None,
           line: int | None = None, history_ids: bool = True) -> RenderedPrompt:
    """Render one prepared row (fields of `distthink rec prepare`) into a user + assistant conversation.

    ``answer`` is the assistant text ("Yes", "No", or a reason starting with the verdict). A title that
    itself contains a placeholder string is refused: it would create an unmatched id token.
    ``history_ids=False`` lists the history by title only in ids mode (inline vectors without History_embs).
    """
    with_ids = mode == "ids" and history_ids
    titles = [str(t) for t in row["history_titles"]]
    labels = [int(v) for v in row["history_labels"]]
    hist_ids = [int(v) for v in row["history_item_ids"]]
    if not (len(titles) == len(labels) == len(hist_ids)):
        raise DataError("history_titles, history_labels and history_item_ids have different lengths",
                        source=source, line=line, field="history_titles", fix="re-run `distthink rec prepare`")
    for text in (*titles, str(row["target_title"])):
        if any(p in text for p in (*ID_TOKENS, HIS_ITEM_LIST, TARGET_ITEM_TITLE)):
            raise DataError(f"the title {text!r} contains a placeholder string", source=source, line=line,
                            field="target_title", fix="rename the item; placeholders are reserved")
    content = template.replace(HIS_ITEM_LIST, history_lines(titles, labels, with_ids))
    content = content.replace(TARGET_ITEM_TITLE, str(row["target_title"]))
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return RenderedPrompt(messages, int(row["user_id"]), int(row["item_id"]), hist_ids if with_ids else [])


def verdict_of(text: str, yes_text: str = "Yes", no_text: str = "No") -> int | None:
    """The answer's first verdict word (case-insensitive, whole word): 1 for yes_text, 0 for no_text, None if
    neither appears."""
    m = re.search(rf"\b({re.escape(yes_text)}|{re.escape(no_text)})\b", text, flags=re.IGNORECASE)
    if m is None:
        return None
    return 1 if m.group(1).lower() == yes_text.lower() else 0


def split_verdict(text: str, yes_text: str = "Yes", no_text: str = "No") -> tuple[int | None, str]:
    """(verdict, reason) of an answer "Yes. because ...": the verdict of a leading verdict word (None when the
    answer does not start with one) and the text after it and its punctuation."""
    m = re.match(rf"\s*({re.escape(yes_text)}|{re.escape(no_text)})\b[\s.,:;!-]*", text, flags=re.IGNORECASE)
    if m is None:
        return None, text.strip()
    return (1 if m.group(1).lower() == yes_text.lower() else 0), text[m.end():].strip()


def template_reason(label: int, target_title: str, target_genres: list[str],
                    history_titles: list[str], history_genres: list[list[str]], history_labels: list[int],
                    max_examples: int = 3) -> str:
    """A reason that is true of the data, beginning with the verdict ("Yes." / "No.").

    It cites the history items that share a genre with the target and were liked (for Yes) or
    disliked (for No); otherwise it falls back to the user's liked genres.
    """
    verdict = "Yes." if label else "No."
    tg = target_genres[0] if target_genres else "unknown-genre"
    tset = set(target_genres)
    same = [(t, lab, g) for t, g, lab in zip(history_titles, history_genres, history_labels) if tset & set(g)]
    wanted = 1 if label else 0
    support = [t for t, lab, _ in same if lab == wanted]
    if support:
        g = next(x for x in target_genres if any(x in hg for t, _, hg in same if t in support))
        n = "one" if len(support) == 1 else "several"
        verb = "liked" if label else "disliked"
        cited = ", ".join(f'"{t}"' for t in support[:max_examples])
        return (f'{verdict} because the user {verb} {n} {g} movie{"s" if len(support) > 1 else ""} in their '
                f'history ({cited}) and "{target_title}" is {_a(g)} movie.')
    liked = sorted({g for gs, lab in zip(history_genres, history_labels) if lab for g in gs})
    if label:
        return (f'{verdict} because "{target_title}" is {_a(tg)} movie, a genre the user has not disliked, '
                f'and viewers with similar tastes rated it highly.')
    if liked:
        return (f'{verdict} because the user mostly liked {", ".join(liked[:3])} movies, and '
                f'"{target_title}" is {_a(tg)} movie that matches none of them.')
    return f'{verdict} because the user has not liked anything similar to "{target_title}", {_a(tg)} movie.'


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word
