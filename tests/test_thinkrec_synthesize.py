"""Reasoning synthesis against a real HTTP endpoint on loopback serving the OpenAI chat-completions shape.

The server is a deterministic teacher: it answers "No" first, and follows a hint stating the label, so the
hint loop, the hint cycling, the verdict prefix and resumability are all exercised over real HTTP. It also
fails the first request with a 503 to exercise the backoff.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from distthink.tasks.thinkrec.teacher import TeacherConfig, apply_reasons, synthesize


class _Teacher(BaseHTTPRequestHandler):
    calls = []
    failed_once = False
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _Teacher.lock:
            _Teacher.calls.append(body)
            fail = not _Teacher.failed_once
            _Teacher.failed_once = True
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        last = body["messages"][-1]["content"]
        if "answered Yes" in last or "is Yes" in last:
            msg = {"role": "assistant", "content": "Yes, on reflection.", "reasoning_content": "likes the genre"}
        elif "answered No" in last or "is No" in last:
            msg = {"role": "assistant", "content": "No. It does not fit.", "reasoning_content": ""}
        else:
            msg = {"role": "assistant", "content": "No. Not their taste."}
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


def _rows():
    return pd.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 20, 30], "label": [1, 0, 1],
                         "history_item_ids": [[5], [], [6]], "history_labels": [[1], [], [0]],
                         "history_titles": [["A (1990)"], [], ["B (1991)"]],
                         "target_title": ["X (2000)", "Y (2001)", "Z (2002)"], "reason": ["", "", ""]})


def test_hint_loop_over_http_with_backoff_and_resume(tmp_path, server):
    cfg = TeacherConfig(base_url=server, model="teacher", max_rounds=3, concurrency=2, backoff_s=0.01)
    out = tmp_path / "reasons.jsonl"
    counts = synthesize(_rows(), out, cfg)
    assert counts == {"skipped_done": 0, "ok": 3, "failed": 0}
    recs = {(d["user_id"], d["item_id"]): d for d in map(json.loads, out.read_text().splitlines())}
    assert recs[(2, 20)]["reason"] == "No. because Not their taste." and recs[(2, 20)]["rounds"] == 1
    assert recs[(1, 10)]["reason"] == "Yes. because likes the genre" and recs[(1, 10)]["rounds"] == 2
    # the hint conversation carries the wrong answer and a hint stating the correct label
    hinted = [c for c in _Teacher.calls if len(c["messages"]) == 3]
    assert hinted and all("Yes" in c["messages"][2]["content"] for c in hinted)
    n_calls = len(_Teacher.calls)
    # re-running asks nothing again; an interrupted (cut) last line is asked again, not lost
    assert synthesize(_rows(), out, cfg)["skipped_done"] == 3 and len(_Teacher.calls) == n_calls
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    assert synthesize(_rows(), out, cfg) == {"skipped_done": 2, "ok": 1, "failed": 0}
    merged = apply_reasons(_rows(), out)
    assert merged["reason"].str.startswith(("Yes. because", "No. because")).all()


def test_rows_never_right_are_stored_as_failed_and_hints_cycle(tmp_path, server):
    cfg = TeacherConfig(base_url=server, model="t", max_rounds=3, backoff_s=0.01,
                        hints=("Please think again ({label}?)", "Try once more ({label}?)"))
    counts = synthesize(_rows().iloc[:1], tmp_path / "r.jsonl", cfg)
    assert counts["failed"] == 1
    hints = [c["messages"][-1]["content"] for c in _Teacher.calls if len(c["messages"]) > 1]
    assert hints == ["Please think again (Yes?)", "Try once more (Yes?)"]


def test_cli_writes_records_and_the_split(tmp_path, server):
    import subprocess
    import sys

    split = tmp_path / "train.parquet"
    _rows().to_parquet(split, index=False)
    env = {"OPENAI_BASE_URL": server, "DISTTHINK_TEACHER_MODEL": "t", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "distthink", "rec", "synthesize", "--split", str(split), "--out",
                        str(tmp_path / "r.jsonl"), "--limit", "2", "--write-split", str(tmp_path / "new.parquet")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["ok"] == 2
    new = pd.read_parquet(tmp_path / "new.parquet")
    assert new["reason"].iloc[0].startswith("Yes. because") and new["reason"].iloc[2] == ""
