"""Reasoning-data synthesis with a teacher model behind an OpenAI-compatible chat endpoint.

For each chosen row (user, item, label) of a prepared split, the teacher is asked whether the user will
enjoy the item and why. The reflection loop, as ThinkRec runs it:

- round 1: ``[user: prompt]``;
- an answer is right when the label's text ("Yes" / "No") appears in it (``match: substring``, ThinkRec's test;
  ``match: strict`` instead reads the answer's first verdict word, so "Not really, yes" counts as Yes, not as No);
- after a wrong answer the conversation becomes ``[user: prompt, assistant: <the wrong verdict>, user: hint]``,
  the hint stating the correct label; every later round *replaces* that last hint with the next phrasing
  (``hints[(round - 2) % len(hints)]``, six phrasings by default), the conversation does not grow;
- at most ``max_rounds`` rounds (default 10); rows that reach it are stored with ``ok: false`` and counted
  (``hit_max_rounds``).

A right answer is stored as ``"Yes. because <reasoning>"`` / ``"No. because <reasoning>"`` (the endpoint's
``reasoning_content`` when it returns one, else the answer's content with a leading verdict word removed).

Output: JSONL, one line per finished row, keyed by (user_id, item_id), appended and flushed as rows finish.
A re-run skips the keys already present, so interrupting loses at most the rows in flight and repeats none.
Rows whose every round was wrong are stored with ``ok: false`` (and are not asked again).

Transport: plain urllib POSTs to ``{base_url}/chat/completions``, retries with exponential backoff on
connection errors, 429 and 5xx; a thread pool bounds the concurrency.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from distthink.errors import ConfigError, DistthinkError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.prompts import verdict_of

log = get_logger(__name__)

#: Six hint phrasings, cycled over the retries; each names the correct label ({label}).
DEFAULT_HINTS = (
    "That is not what happened: the user's real answer was {label}. Look at the history again and explain what "
    "your analysis missed.",
    "The correct verdict is {label}. Go back over the liked and disliked items and reason towards it.",
    "In fact the answer is {label}. Which signals in the history point that way? Explain your oversight.",
    "Reconsider: this user answered {label}. Re-read the history and give the reasoning that leads there.",
    "Your verdict was wrong; it should be {label}. Work out from the history why, and state the verdict.",
    "Please think it through once more. The ground truth is {label}; explain the preference that supports it.",
)
MATCH_MODES = ("substring", "strict")
TEACHER_TEMPLATE = prompts.TEXT_TEMPLATE.replace("Answer Yes or No.",
                                                 "Answer Yes or No first, then explain your reasoning.")


@dataclass
class TeacherConfig:
    base_url: str
    model: str
    api_key: str | None = None
    hints: tuple[str, ...] = DEFAULT_HINTS
    max_rounds: int = 10
    match: str = "substring"           # substring (ThinkRec) | strict (first verdict word)
    yes_text: str = "Yes"
    no_text: str = "No"
    concurrency: int = 4
    max_retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    temperature: float = 0.7
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ConfigError("teacher base URL and model are required. Fix: --base-url/--model or the "
                              "OPENAI_BASE_URL / DISTTHINK_TEACHER_MODEL environment variables")
        if self.max_rounds < 1 or self.concurrency < 1:
            raise ConfigError(f"max_rounds={self.max_rounds} and concurrency={self.concurrency} must be >= 1. "
                              "Fix: e.g. --max-rounds 10 --concurrency 4")
        if self.match not in MATCH_MODES:
            raise ConfigError(f"match={self.match!r}. Fix: use substring (ThinkRec) or strict")
        if not self.hints or any("{label}" not in h for h in self.hints):
            raise ConfigError("every hint must contain {label}. Fix: e.g. 'The answer is {label}. Re-analyse.'")


def chat(cfg: TeacherConfig, messages: list[dict]) -> dict:
    """One chat completion -> the first choice's message dict (retries with backoff)."""
    body = json.dumps({"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                       **cfg.extra}).encode()
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    last = None
    for attempt in range(cfg.max_retries + 1):
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                data = json.loads(resp.read())
            return data["choices"][0]["message"]
        except urllib.error.HTTPError as err:
            last = err
            if err.code != 429 and err.code < 500:
                raise DistthinkError(f"teacher endpoint {url} answered HTTP {err.code}: {err.read()[:300]!r}. "
                                     "Fix: check the model name and API key") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, IndexError, ValueError) as err:
            last = err
        if attempt < cfg.max_retries:
            time.sleep(cfg.backoff_s * (2 ** attempt))
    raise DistthinkError(f"teacher endpoint {url} failed {cfg.max_retries + 1} times (last: {last}). "
                         "Fix: check that the server is up; re-running resumes where this stopped")


def is_right(text: str, label: int, cfg: TeacherConfig) -> bool:
    """ThinkRec's stop test (substring: the label's text appears anywhere in the answer) or the strict one."""
    want = cfg.yes_text if label else cfg.no_text
    if cfg.match == "substring":
        return want in text
    return verdict_of(text, cfg.yes_text, cfg.no_text) == label


def _reason(msg: dict, label: int, cfg: TeacherConfig) -> str:
    """The stored reason: the verdict, then the endpoint's reasoning_content, else the answer with a leading
    verdict word (and its punctuation) removed."""
    body = (msg.get("reasoning_content") or "").strip()
    if not body:
        body = (msg.get("content") or "").strip()
        head = re.match(rf"\W*({re.escape(cfg.yes_text)}|{re.escape(cfg.no_text)})\b[\s.,:;!-]*", body,
                        flags=re.IGNORECASE)
        if head:
            body = body[head.end():]
    return f"{cfg.yes_text if label else cfg.no_text}. because {body}"


def reflection_messages(prompt: dict, label: int, retry: int, cfg: TeacherConfig) -> list[dict]:
    """The conversation of retry `retry` (0 = the first question): the prompt alone, then the prompt + the wrong
    verdict as an assistant turn + the hint of this retry (which replaces the previous one)."""
    if retry == 0:
        return [prompt]
    wrong = cfg.no_text if label else cfg.yes_text
    hint = cfg.hints[(retry - 1) % len(cfg.hints)].format(label=cfg.yes_text if label else cfg.no_text)
    return [prompt, {"role": "assistant", "content": wrong}, {"role": "user", "content": hint}]


def ask(cfg: TeacherConfig, row: dict) -> dict:
    """Run the reflection loop for one row (module docstring). Returns the JSONL record."""
    label = int(row["label"])
    prompt = prompts.render(row, template=TEACHER_TEMPLATE, mode="text", answer="").messages[0]
    key = {"user_id": int(row["user_id"]), "item_id": int(row["item_id"]), "label": label}
    for k in range(cfg.max_rounds):
        msg = chat(cfg, reflection_messages(prompt, label, k, cfg))
        if is_right(msg.get("content") or "", label, cfg):
            return {**key, "reason": _reason(msg, label, cfg), "rounds": k + 1, "ok": True}
    return {**key, "reason": "", "rounds": cfg.max_rounds, "ok": False}


def done_keys(path: Path) -> set[tuple[int, int]]:
    keys = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that row is asked again
                keys.add((int(d["user_id"]), int(d["item_id"])))
    return keys


def synthesize(rows: pd.DataFrame, out: str | Path, cfg: TeacherConfig) -> dict:
    """Ask the teacher for every row not yet in `out`; append records as they finish. Returns counts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    todo = [r for r in rows.to_dict("records") if (int(r["user_id"]), int(r["item_id"])) not in done]
    lock = threading.Lock()
    counts = {"skipped_done": len(rows) - len(todo), "ok": 0, "failed": 0}
    hit = 0
    # a partial last line (interrupted write) must not glue onto the next record
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with open(out, "a") as f:
            f.write("\n")
    with open(out, "a") as f, ThreadPoolExecutor(cfg.concurrency) as pool:
        for rec in pool.map(lambda r: ask(cfg, r), todo):
            with lock:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                counts["ok" if rec["ok"] else "failed"] += 1
                hit += int(not rec["ok"] and rec["rounds"] >= cfg.max_rounds)
    counts["hit_max_rounds"] = hit
    if hit:
        log.warning("synthesize: %d of %d rows were still wrong after %d rounds (stored with ok: false)", hit,
                    len(todo), cfg.max_rounds)
    return counts


def select_rows(split: pd.DataFrame, scores: str | None = None, threshold: float = 0.0,
                limit: int | None = None) -> pd.DataFrame:
    """The rows to synthesise: with `scores` (a `rec eval --scores` Parquet), those the model gets wrong
    (score > threshold predicts Yes); then the first `limit`."""
    if scores:
        s = pd.read_parquet(scores)
        wrong = s[(s["score"] > threshold).astype(int) != s["label"]]["sample_index"].to_numpy()
        split = split.iloc[wrong]
    return split.iloc[:limit] if limit is not None else split


def apply_reasons(split: pd.DataFrame, records: str | Path) -> pd.DataFrame:
    """The split with `reason` replaced by the synthesised ones where the teacher succeeded."""
    recs = []
    for x in Path(records).read_text().splitlines():
        try:
            recs.append(json.loads(x))
        except json.JSONDecodeError:
            continue  # a line cut by an interruption (its row was asked again on resume)
    got = {(d["user_id"], d["item_id"]): d["reason"] for d in recs if d.get("ok")}
    out = split.copy()
    keys = list(zip(out["user_id"].astype(int), out["item_id"].astype(int)))
    base = out["reason"] if "reason" in out else pd.Series([""] * len(out), index=out.index)
    out["reason"] = [got.get(k, b) for k, b in zip(keys, base)]
    return out
