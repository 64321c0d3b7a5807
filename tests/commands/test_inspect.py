"""`distthink inspect`: runs offline with no arguments, marks exactly the learned tokens, reports stats
and skip counts, and explains its flags."""

import json
import os
import re
import subprocess
import sys

import pytest

from distthink.cli import main
from distthink.commands.inspect import dataset_stats, render_sample, token_runs
from distthink.config import DataConfig
from distthink.data.types import EncodedSample
from distthink.models.tiny import tiny_tokenizer

MARK = re.compile(r"\[\[(?:w=[0-9.e+-]+\|)?|\]\]")


def _strip(text: str) -> str:
    return MARK.sub("", text)


def test_render_marks_exactly_the_learned_tokens():
    tok = tiny_tokenizer("qwen3")
    ctx = tok.encode("user asks here ", add_special_tokens=False)
    ans = tok.encode("the answer", add_special_tokens=False)
    half = tok.encode(" and more", add_special_tokens=False)
    ids = ctx + ans + half
    labels = [-100] * len(ctx) + ans + half
    weights = [0.0] * len(ctx) + [1.0] * len(ans) + [0.5] * len(half)
    s = EncodedSample(ids, labels, weights)
    out = render_sample(tok, s, color=False)
    assert _strip(out) == tok.decode(ids)  # markers only, text untouched
    assert out == tok.decode(ctx) + "[[" + tok.decode(ans) + "]][[w=0.5|" + tok.decode(half) + "]]"
    assert [r[0] for r in token_runs(s)] == ["context", "learned", "weighted"]
    coloured = render_sample(tok, s, color=True)
    assert "\033[1;32m" in coloured and "\033[1;33m" in coloured and "[[" not in coloured


def test_dataset_stats_hand_computed():
    a = EncodedSample([1, 2, 3, 4], [-100, -100, 3, 4], [0, 0, 1, 1])
    b = EncodedSample([5, 6], [-100, 6], [0, 2.0])
    st = dataset_stats([a, b], budget=8)
    assert st["tokens"] == 6 and st["learned_tokens"] == 3
    assert st["learned_fraction"] == pytest.approx(0.5)
    assert st["weight_sum"] == pytest.approx(4.0)
    assert st["micro_batches"] == 1 and st["packing_efficiency"] == pytest.approx(6 / 8)
    assert st["padded_vs_packed_tokens_ratio"] == pytest.approx(8 / 6)  # 2 rows x 4 vs 6 real tokens
    assert dataset_stats([a, b], budget=3)["over_budget"] == 1


def test_inspect_bundled_defaults(capsys):
    assert main(["inspect", "-n", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("-- sample ") == 2
    assert "[[" in out and "]]" in out
    assert "learned tokens:" in out and "packing at 4096 tokens/micro-batch" in out
    assert "skipped: none" in out
    # a user turn of the bundled data is never inside a learned span
    for span in re.findall(r"\[\[(.*?)\]\]", out, flags=re.S):
        assert "<|im_start|>user" not in span


def test_inspect_think_mask_learns_fewer_tokens(capsys):
    main(["inspect", "-n", "0", "--think", "supervise"])
    sup = capsys.readouterr().out
    main(["inspect", "-n", "1", "--think", "mask", "--color", "never"])
    masked = capsys.readouterr().out
    # masked reasoning is shown as context in {{...}}, never inside a learned [[...]] span
    assert re.search(r"\{\{<think>.*?</think>", masked, flags=re.S)
    assert not any("<think>" in span for span in re.findall(r"\[\[(.*?)\]\]", masked, flags=re.S))
    learned = lambda text: int(re.search(r"learned tokens: (\d+)", text).group(1))  # noqa: E731
    assert learned(masked) < learned(sup)


def test_inspect_max_length_drop_is_counted(capsys):
    assert main(["inspect", "-n", "0", "--max-length", "45", "--truncation", "drop", "--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"skipped: (\d+) \(too_long: \1\)", out).group(1))
    kept = int(re.search(r"samples: (\d+) ", out).group(1))
    assert n > 0 and n + kept == 300
    assert int(re.search(r"max (\d+)", out).group(1)) <= 45


def _bad_file(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [
        json.dumps(good),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": []}),
        json.dumps(good),
        "{not json",
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_inspect_skip_reports_counts(tmp_path, capsys):
    path = _bad_file(tmp_path)
    assert main(["inspect", "--data", str(path), "--on-error", "skip", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples: 2 " in out
    assert "records: 6 " in out
    skipped = next(line for line in out.splitlines() if line.startswith("skipped:"))
    assert skipped == "skipped: 4 (empty_conversation: 1, invalid_json: 1, non_string_content: 1, unknown_role: 1)"
    assert "bad.jsonl, line 2, field 'messages[0].role'" in out  # each reason shows a located example


def test_inspect_raise_names_the_line(tmp_path, capsys):
    path = _bad_file(tmp_path)
    assert main(["inspect", "--data", str(path), "--on-error", "raise"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bad.jsonl" in err and "line 2" in err


def test_inspect_skips_by_default_like_training(tmp_path, capsys):
    """One default for malformed rows: `distthink inspect` does what training (data.on_error) does."""
    assert DataConfig().on_error == "skip"
    path = _bad_file(tmp_path)
    assert main(["inspect", "--data", str(path), "-n", "0"]) == 0
    out = capsys.readouterr().out
    assert "samples: 2 " in out and "skipped: 4 (" in out
    assert "bad.jsonl, line 2, field 'messages[0].role'" in out  # the first reason of each kind, located


@pytest.mark.parametrize("rows", [[], ["", "   "], ['{"messages": []}', "{not json"]],
                         ids=["empty", "blank_lines", "all_rows_bad"])
def test_inspect_of_nothing_is_an_error(tmp_path, capsys, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    assert main(["inspect", "--data", str(path)]) == 2
    captured = capsys.readouterr()
    assert "samples: 0" not in captured.out
    err = captured.err.strip()
    assert err.startswith("error:") and "data.jsonl" in err and "Fix:" in err
    if rows and rows[0].startswith("{"):
        assert "all 2 records were skipped" in err and "empty_conversation" in err and "invalid_json" in err
    else:
        assert "no records" in err


def test_inspect_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--data", "--tokenizer", "--think", "--max-length", "--on-error", "-n", "--budget",
                 "--truncation", "--color", "--expand-turns"]:
        assert flag in out
    assert "[[" in out  # the bracket legend


def test_inspect_cli_entry_point_piped():
    """The installed command with no arguments works offline; piped output uses brackets, no ANSI."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "distthink", "inspect", "-n", "1"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[[" in proc.stdout and "\033[" not in proc.stdout
