"""Reasoning synthesis (ThinkRec's reflection loop) against a real HTTP endpoint on loopback serving the OpenAI
chat-completions shape.

The server is a deterministic teacher driven by the target title of the prompt: "Seven" gives the right verdict
only after 7 hints, "Never" never does, "Tricky" answers "Notably, yes" (contains the text "No" without meaning
No), anything else gets it right after one hint. Before a hint it answers "Maybe. Hard to say." (neither label).
Once hinted, it answers the label named in the hint. The first request of a session fails with a 503 to exercise
the backoff. Every request is recorded, so the message layout (wrong verdict + hint, the hint replaced on each
retry, six phrasings cycled) is checked on what really went over the wire.
"""

import json
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from distthink.errors import ConfigError
from distthink.tasks.thinkrec.teacher import DEFAULT_HINTS, TeacherConfig, apply_reasons, synthesize

NEEDS = {"Seven": 7, "Never": 10 ** 9}


def _title(body: dict) -> str:
    return re.search(r'movie "(\w+)', body["messages"][0]["content"]).group(1)


class _Teacher(BaseHTTPRequestHandler):
    calls = defaultdict(list)  # title -> request bodies, in order
    failed_once = False
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        title = _title(body)
        with _Teacher.lock:
            fail = not _Teacher.failed_once
            _Teacher.failed_once = True
            if not fail:
                _Teacher.calls[title].append(body)
            n_hints = len(_Teacher.calls[title]) - 1
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        msgs = body["messages"]
        if title == "Tricky" and n_hints == 0:
            msg = {"role": "assistant", "content": "Notably, yes: it fits."}
        elif len(msgs) == 1 or n_hints < NEEDS.get(title, 1):
            msg = {"role": "assistant", "content": "Maybe. Hard to say."}
        elif "Yes" in msgs[-1]["content"]:
            msg = {"role": "assistant", "content": "Yes, on reflection.", "reasoning_content": "likes the genre"}
        else:
            msg = {"role": "assistant", "content": "No. It does not fit."}
        out = json.dumps({"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Teacher.calls.clear()
    _Teacher.failed_once = False
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _rows(titles=("A", "B", "C"), labels=(1, 0, 1)):
    n = len(titles)
    return pd.DataFrame({"user_id": range(1, n + 1), "item_id": [10 * (i + 1) for i in range(n)], "label": list(labels),
                         "history_item_ids": [[5]] * n, "history_labels": [[1]] * n,
                         "history_titles": [["Old (1990)"]] * n, "target_title": [f"{t} (2000)" for t in titles],
                         "reason": [""] * n})


def _records(path):
    return {(d["user_id"], d["item_id"]): d for d in map(json.loads, path.read_text().splitlines())}


def test_six_hints_cycle_and_each_retry_replaces_the_last_hint(tmp_path, server):
    cfg = TeacherConfig(base_url=server, model="teacher", concurrency=2, backoff_s=0.01)
    out = tmp_path / "reasons.jsonl"
    counts = synthesize(_rows(("Seven", "B"), (1, 0)), out, cfg)
    assert counts == {"skipped_done": 0, "ok": 2, "failed": 0, "hit_max_rounds": 0}
    assert len(DEFAULT_HINTS) == 6 and len(set(DEFAULT_HINTS)) == 6
    calls = _Teacher.calls["Seven"]
    assert len(calls) == 8 and _records(out)[(1, 10)]["rounds"] == 8
    prompt = calls[0]["messages"]
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    for i, body in enumerate(calls[1:], start=1):
        # never a growing conversation: prompt, the wrong verdict, this retry's hint (the previous one replaced)
        assert body["messages"] == [prompt[0], {"role": "assistant", "content": "No"},
                                    {"role": "user", "content": DEFAULT_HINTS[(i - 1) % 6].format(label="Yes")}]
    assert calls[7]["messages"][2] == calls[1]["messages"][2]  # the 7th hint wrapped round to the first phrasing
    rec = _records(out)
    assert rec[(1, 10)]["reason"] == "Yes. because likes the genre"
    assert rec[(2, 20)]["reason"] == "No. because It does not fit." and rec[(2, 20)]["rounds"] == 2
    assert _Teacher.calls["B"][1]["messages"][1] == {"role": "assistant", "content": "Yes"}


def test_substring_stop_as_thinkrec_and_the_strict_mode(tmp_path, server):
    """ThinkRec stops when the label's text appears in the answer: "Notably, yes" contains "No" and is taken as a
    right No on the first round. The strict mode reads the first verdict word (yes) and asks again."""
    rows = _rows(("Tricky",), (0,))
    sub = TeacherConfig(base_url=server, model="t", backoff_s=0.01)
    synthesize(rows, tmp_path / "sub.jsonl", sub)
    rec = _records(tmp_path / "sub.jsonl")[(1, 10)]
    assert rec["ok"] and rec["rounds"] == 1 and rec["reason"] == "No. because Notably, yes: it fits."
    _Teacher.calls.clear()
    strict = TeacherConfig(base_url=server, model="t", backoff_s=0.01, match="strict")
    synthesize(rows, tmp_path / "strict.jsonl", strict)
    rec = _records(tmp_path / "strict.jsonl")[(1, 10)]
    assert rec["ok"] and rec["rounds"] == 2 and rec["reason"] == "No. because It does not fit."
    with pytest.raises(ConfigError, match="match='exact'.*Fix"):
        TeacherConfig(base_url=server, model="t", match="exact")


def test_max_rounds_cap_is_counted_and_resume_asks_nothing_twice(tmp_path, server):
    cfg = TeacherConfig(base_url=server, model="teacher", concurrency=2, backoff_s=0.01)
    out = tmp_path / "reasons.jsonl"
    counts = synthesize(_rows(("Never", "A", "C")), out, cfg)
    assert counts == {"skipped_done": 0, "ok": 2, "failed": 1, "hit_max_rounds": 1}
    assert len(_Teacher.calls["Never"]) == 10  # the default cap
    assert _records(out)[(1, 10)] == {"user_id": 1, "item_id": 10, "label": 1, "reason": "", "rounds": 10,
                                      "ok": False}
    n_calls = sum(map(len, _Teacher.calls.values()))
    # re-running asks nothing again; an interrupted (cut) last line is asked again, not lost
    assert synthesize(_rows(("Never", "A", "C")), out, cfg)["skipped_done"] == 3
    assert sum(map(len, _Teacher.calls.values())) == n_calls
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    assert synthesize(_rows(("Never", "A", "C")), out, cfg)["skipped_done"] == 2
    merged = apply_reasons(_rows(("Never", "A", "C")), out)
    assert merged["reason"].tolist() == ["", "No. because It does not fit.", "Yes. because likes the genre"]


def test_cli_writes_records_and_the_split(tmp_path, server):
    import subprocess
    import sys

    split = tmp_path / "train.parquet"
    _rows(("A", "Never", "C")).to_parquet(split, index=False)
    env = {"OPENAI_BASE_URL": server, "DISTTHINK_TEACHER_MODEL": "t", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "distthink", "rec", "synthesize", "--split", str(split), "--out",
                        str(tmp_path / "r.jsonl"), "--limit", "2", "--max-rounds", "3", "--write-split",
                        str(tmp_path / "new.parquet")], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert (res["ok"], res["failed"], res["hit_max_rounds"]) == (1, 1, 1)
    assert len(_Teacher.calls["Never"]) == 3
    new = pd.read_parquet(tmp_path / "new.parquet")
    assert new["reason"].iloc[0].startswith("Yes. because") and new["reason"].iloc[1] == ""
