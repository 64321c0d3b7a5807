"""The encoded-data cache (distthink/data/cache.py, parallel_encode.py, fingerprint.py, engine/shared_cache.py).

The reference everywhere is the in-memory encoding (build_sft_dataset, thinkrec's build_samples, the molecule
encoder applied record by record): a cached split must give back the same samples token for token, weight for
weight, meta for meta, with any number of encoding processes, and the same report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import ROOT, env, free_port

from distthink.config import load_config
from distthink.data import cache as cache_mod
from distthink.data.cache import CachedSplit, Column
from distthink.data.chat import ChatPolicy
from distthink.data.dataset import build_sft_dataset
from distthink.data.parallel_encode import CHUNK_RECORDS, SplitEncoding, build_split, encoding_key, entry_name
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.engine import batching
from distthink.errors import DataError, LabelAuditError
from distthink.models.tiny import tiny_tokenizer
from distthink.resources import ASSETS
from distthink.tasks.sft import SFTTask

sys.path.insert(0, str(ROOT / "benchmarks"))
from encode import make_dataset  # noqa: E402 - the benchmark's multi-turn reasoning generator

TRAIN, EVAL = ASSETS / "sample_sft.jsonl", ASSETS / "sample_sft_eval.jsonl"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("qwen3")


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false", *overrides])


def _load(cfg, tok, split="train", task=None):
    task = task or SFTTask(cfg)
    task.prepare_tokenizer(tok)
    return batching.load_split(cfg, task, split, tok)


def assert_same(got, ref):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.input_ids == b.input_ids, i
        assert a.labels == b.labels, i
        assert a.loss_weights == b.loss_weights, i  # exact: the palette holds float64 weights bit for bit
        assert a.meta == b.meta, i


# ----------------------------------------------------------------------------------------------------------
# Cached == in memory.

@pytest.mark.parametrize("num_proc", [1, 2])
def test_bundled_splits_equal_the_in_memory_encoding(tmp_path, tok, num_proc):
    cfg = _cfg(tmp_path, f"data.num_proc={num_proc}")
    for split, path in (("train", TRAIN), ("eval", EVAL)):
        ref, report = build_sft_dataset(str(path), tok, batching.chat_policy(cfg))
        got = _load(cfg, tok, split)
        assert isinstance(got, CachedSplit)
        assert_same(got, ref)
        assert got.meta["report"] == report.to_dict(with_examples=True)
        assert got.lengths.tolist() == [len(s) for s in ref]


def _reasoning_records(n, seed=0):
    """Multi-turn conversations with reasoning (the encode benchmark's generator), plus records that are skipped."""
    recs = [{"messages": m} for m in make_dataset(n, seed=seed, max_words=400)]
    recs[3] = {"messages": [{"role": "robot", "content": "hi"}]}             # unknown role
    recs[70] = {"messages": [{"role": "user", "content": "only a question"}]}  # nothing to learn
    return recs


@pytest.mark.parametrize("policy", [
    {"think_weight": 0.3, "max_length": 256, "truncation": "truncate_left"},
    {"expand_turns": True, "think": "mask", "max_length": 512},
    {"think": "drop", "max_length": 512, "truncation": "drop"},
])
def test_multi_turn_reasoning_on_qwen3_equals_in_memory(tmp_path, qwen3_tokenizer, policy):
    path = tmp_path / "reason.jsonl"
    lines = [json.dumps(r) for r in _reasoning_records(150)]
    lines.insert(10, "{not json")
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, f"data.train={path}", "data.num_proc=2", "data.max_length=512", "batch.max_tokens=4096",
               f"data.policy={json.dumps(policy)}")
    ref, report = build_sft_dataset(str(path), qwen3_tokenizer, batching.chat_policy(cfg), on_error="skip")
    got = _load(cfg, qwen3_tokenizer)
    assert_same(got, ref)
    stored = got.meta["report"]
    assert stored == report.to_dict(with_examples=True)
    assert report.num_skipped >= 3 and stored["records"] == 151  # skips of both workers add up
    assert len(got.meta["palette"]) >= 2  # distinct weights (think_weight / masked reasoning / prompt)


def test_thinkrec_split_equals_build_samples(tmp_path):
    from distthink.models.inject import add_placeholder_tokens
    from distthink.tasks.thinkrec import prompts
    from distthink.tasks.thinkrec.samples import build_samples
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic
    from distthink.tasks.thinkrec.task import ThinkRecTask

    prep = tmp_path / "prep"
    prepare_synthetic(prep, reasons="template", n_users=30, n_items=50, min_per_user=10, max_per_user=20)
    cfg = _cfg(tmp_path, "task.name=thinkrec", f"data.train={prep / 'train.parquet'}", "data.num_proc=2",
               "data.policy.think=drop", "task.options.reason_ratio=0.5", "data.max_train_samples=150")
    task = ThinkRecTask(cfg)
    got = _load(cfg, tiny_tokenizer("qwen3"), task=task)
    ref_tok = tiny_tokenizer("qwen3")
    add_placeholder_tokens(ref_tok, list(prompts.ID_TOKENS))
    ref = build_samples(ref_tok, prep / "train.parquet", task.opt, ChatPolicy(think="drop", max_length=1024),
                        seed=cfg.train.seed, split="train", limit=150)
    assert_same(got, ref)
    kinds = got.column("rec_type")
    assert 0 < (kinds == "reasoning").sum() < len(kinds)  # both kinds drawn, as build_samples drew them


@pytest.mark.parametrize("think_mode", ["off", "free"])
def test_molecule_split_equals_the_encoder_applied_in_memory(tmp_path, think_mode):
    from distthink.tasks.molecule.task import MoleculeTask

    cfg = _cfg(tmp_path, "task.name=molecule", "data.num_proc=2", "data.max_train_samples=80",
               f"task.options.think_mode='{think_mode}'", "batch.mode=samples", "loss.impl=fused")
    task = MoleculeTask(cfg)
    tok = tiny_tokenizer("qwen3")
    got = _load(cfg, tok, task=task)
    enc = task.split_encoding("train", tok)
    ref = []
    for src, line, rec in list(enc.records())[:80]:
        ref += enc.encoder(tok, src, line, rec)[0]
    assert len(got) == len(ref) == 80
    for a, b in zip(got, ref):
        assert (a.input_ids, a.labels, a.loss_weights) == (b.input_ids, b.labels, b.loss_weights)
        ga, gb = a.meta.pop("graphs"), b.meta.pop("graphs")
        assert a.meta == b.meta
        assert len(ga) == len(gb) == 1
        for key in ("x", "edge_index", "edge_attr"):
            assert torch.equal(ga[0][key], gb[0][key]) and ga[0][key].dtype == gb[0][key].dtype
        assert ga[0].smiles == gb[0].smiles and ga[0].num_nodes == gb[0].num_nodes
    if think_mode == "free":  # the on-policy hook replaces samples in this process only
        new = EncodedSample([1, 2], [IGNORE_INDEX, 2], [0.0, 1.0], {"free_step": 3})
        got[5] = new
        assert got[5] is new and CachedSplit(got.path, unpack=enc.unpack)[5].meta["free_step"] is None


# ----------------------------------------------------------------------------------------------------------
# Keys: what changes the encoding makes a new entry; nothing else does.

def _key(cfg, tokenizer):
    return encoding_key(batching.chat_split_encoding(cfg, "train"), tokenizer)[1]


def test_fingerprint_follows_what_changes_the_encoding(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    data.write_bytes(TRAIN.read_bytes())
    base = _cfg(tmp_path, f"data.train={data}")
    k0 = _key(base, tok)
    assert _key(_cfg(tmp_path, f"data.train={data}", "train.lr=1e-5", "train.output_dir=elsewhere",
                     "batch.max_tokens=4096", "data.num_proc=7", "data.on_error=raise",
                     "data.policy.allow_full_sequence_loss=true"), tok) == k0
    assert _key(_cfg(tmp_path, f"data.train={data}", "data.policy.think=mask"), tok) != k0
    assert _key(_cfg(tmp_path, f"data.train={data}", "data.max_length=512"), tok) != k0
    assert _key(_cfg(tmp_path, f"data.train={data}", "data.max_train_samples=10"), tok) != k0
    other = tiny_tokenizer("qwen3")
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    assert _key(base, other) != k0
    other = tiny_tokenizer("qwen3")
    other.add_tokens(["<extra>"], special_tokens=True)
    assert _key(base, other) != k0
    raw = bytearray(data.read_bytes())
    raw[100] = ord("x") if raw[100] != ord("x") else ord("y")
    data.write_bytes(bytes(raw))
    assert _key(base, tok) != k0
    data.write_bytes(TRAIN.read_bytes())
    assert _key(base, tok) == k0  # same bytes again, same key (the hash memo follows the file's stat)


def test_a_changed_source_is_encoded_again_never_read_stale(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    data.write_bytes(TRAIN.read_bytes())
    cfg = _cfg(tmp_path, f"data.train={data}")
    first = _load(cfg, tok)
    recs = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    recs[0]["messages"][-1]["content"] = "A different answer."
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    second = _load(cfg, tok)
    assert second.path != first.path
    assert_same(second, build_sft_dataset(str(data), tok, batching.chat_policy(cfg))[0])
    assert second[0].input_ids != first[0].input_ids


def test_train_and_eval_on_one_file_share_one_entry(tmp_path, tok):
    cfg = _cfg(tmp_path, f"data.eval={TRAIN}")
    assert _load(cfg, tok, "train").path == _load(cfg, tok, "eval").path


# ----------------------------------------------------------------------------------------------------------
# Crashes, damage, one writer.

def _prepare(args, extra_env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "distthink.cli", "prepare", *args], cwd=ROOT,
                          env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def test_a_crash_during_encode_leaves_nothing_a_later_run_reads(tmp_path, tok):
    cache = tmp_path / "cache"
    args = [f"data.cache_dir={cache}", "data.eval=null", "data.num_proc=1", "--json"]
    crashed = _prepare(args, {"DISTTHINK_FAULT_KILL_DURING_ENCODE": "2"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert "kills itself" in crashed.stderr
    temps = list(cache.glob(".tmp-*"))
    assert len(temps) == 1 and (temps[0] / "tokens.int32").stat().st_size > 0  # two chunks were written
    assert not [p for p in cache.iterdir() if cache_mod.is_complete(p)]
    with pytest.raises(DataError, match="incomplete or damaged"):
        CachedSplit(temps[0])
    done = _prepare(args)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.splitlines()[-1])
    assert row["status"] == "built" and row["samples"] == 300
    assert not list(cache.glob(".tmp-*"))  # the dead writer's temp directory was removed
    assert_same(CachedSplit(row["entry"]), build_sft_dataset(str(TRAIN), tok, ChatPolicy(max_length=1024))[0])


def test_a_damaged_entry_is_refused_with_the_fix(tmp_path, tok):
    data = _load(_cfg(tmp_path), tok)
    with open(data.path / "tokens.int32", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match=r"tokens\.int32.*Fix: delete"):
        CachedSplit(data.path)


_WORKER = """
import hashlib, json, sys
from distthink.config import load_config
from distthink.engine import batching, distributed as dist
from distthink.engine.task import make_task
from distthink.models.load import load_tokenizer

cfg = load_config(None, sys.argv[2:])
acc = dist.setup(cfg)
tok = load_tokenizer(cfg)
task = make_task(cfg)
task.prepare_tokenizer(tok)
data = batching.load_split(cfg, task, "train", tok)
h = hashlib.sha256()
for s in data:
    h.update(json.dumps([s.input_ids, s.labels, s.loss_weights, s.meta]).encode())
with open(f"{sys.argv[1]}.{acc.process_index}", "w") as fh:
    json.dump({"n": len(data), "sha": h.hexdigest(), "entry": str(data.path)}, fh)
dist.teardown(acc)
"""


def _in_memory_sha(tok):
    import hashlib

    h = hashlib.sha256()
    for s in build_sft_dataset(str(TRAIN), tok, ChatPolicy(max_length=1024))[0]:
        h.update(json.dumps([s.input_ids, s.labels, s.loss_weights, s.meta]).encode())
    return h.hexdigest()


def test_two_ranks_one_writer_both_read(tmp_path, tok):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(script), str(out), f"data.cache_dir={tmp_path / 'cache'}",
           "data.eval=null", "data.num_proc=1", "logging.progress=false"]
    # every rank's INFO lines (by default rank 1 logs warnings only); rank 0's lines carry no prefix
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), "DISTTHINK_LOG_LEVEL": "INFO"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("encoded data.train in") == 1  # exactly one process encoded
    assert re.search(r"^\S+ INFO distthink.data.parallel_encode: encoded data.train", proc.stderr, re.M)
    assert "[rank1] INFO distthink.engine.shared_cache: waiting for the writing rank" in proc.stderr
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert results[0] == results[1] and results[0]["n"] == 300
    assert results[0]["sha"] == _in_memory_sha(tok)


def test_node_scope_each_node_writes_its_own_disk(tmp_path, tok):
    """Two single-rank 'nodes' (two torchrun agents, static rendezvous) with node-local cache folders: with
    data.cache_scope=node each node's local rank 0 encodes into its own folder."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", f"--master_port={port}", "--master_addr=127.0.0.1", str(script),
               str(tmp_path / "out"), "data.cache_dir=auto", "data.cache_scope=node", "data.eval=null",
               "data.num_proc=1", "logging.progress=false"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(DISTTHINK_CACHE_DIR=tmp_path / f"node{node}",
                                                                DISTTHINK_LOG_LEVEL="INFO"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert all(e.count("encoded data.train in") == 1 for e in errs)
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert results[0]["sha"] == results[1]["sha"] == _in_memory_sha(tok)
    assert Path(results[0]["entry"]).parent == tmp_path / "node0" and Path(results[1]["entry"]).parent == \
        tmp_path / "node1"


# ----------------------------------------------------------------------------------------------------------
# Format details.

class _ManyWeights:
    """An encoder whose tokens carry 300 distinct weights (and one learned token of weight 0)."""

    def __call__(self, tokenizer, source, line, rec):
        n = 3 + line % 5
        w = [0.0] + [(line * 7 + j) / 1000 for j in range(1, n)]
        labels = [IGNORE_INDEX] + [line + j for j in range(1, n)]
        w[-1] = 0.0  # learned, weight 0: kept apart from "not learned" by the palette / the wide columns
        return [EncodedSample(list(range(line, line + n)), labels, w, {"line": line})], []


def test_more_than_255_distinct_weights_switch_to_exact_wide_columns(tmp_path, tok):
    recs = [(str(i), i, None) for i in range(1, 201)]
    enc = SplitEncoding(sources=[], records=lambda: iter(recs), encoder=_ManyWeights(), policy=ChatPolicy(),
                        columns=(Column("line", "int"),))
    inputs, key = encoding_key(enc, tok)
    path = build_split(enc, tok, tmp_path, entry_name(enc, key), inputs=inputs, num_proc=2, progress=False)
    got = CachedSplit(path)
    assert got.meta["weights"] == "wide"
    ref = [s for _, line, _ in recs for s in _ManyWeights()(tok, "", line, None)[0]]
    assert_same(got, ref)


def test_records_are_streamed_not_materialised(tmp_path, tok, monkeypatch):
    pulled, worst = [0], [0]

    def records():
        for i in range(1, 5 * CHUNK_RECORDS):
            pulled[0] += 1
            yield "", i, None

    class Counting(_ManyWeights):
        done = 0

        def __call__(self, *a):
            Counting.done += 1
            worst[0] = max(worst[0], pulled[0] - Counting.done)
            return super().__call__(*a)

    enc = SplitEncoding(sources=[], records=records, encoder=Counting(), policy=ChatPolicy(),
                        columns=(Column("line", "int"),))
    inputs, key = encoding_key(enc, tok)
    build_split(enc, tok, tmp_path, entry_name(enc, key), inputs=inputs, num_proc=1, progress=False)
    assert Counting.done == pulled[0] and worst[0] < CHUNK_RECORDS  # one chunk ahead at most

    # Parquet is read batch by batch: reading the whole table is not even possible here.
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=50)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole table was read"))
    monkeypatch.setattr("distthink.data.dataset.PARQUET_BATCH_ROWS", 16)
    got = _load(_cfg(tmp_path, f"data.train={tmp_path / 't.parquet'}"), tok)
    ref = build_sft_dataset(str(TRAIN), tok, ChatPolicy(max_length=1024))[0]
    assert [(s.input_ids, s.labels, s.loss_weights, s.meta["line"]) for s in got] == \
        [(s.input_ids, s.labels, s.loss_weights, s.meta["line"]) for s in ref]


def test_report_and_label_audit_are_replayed_from_the_cache(tmp_path, tok, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TRAIN.read_text() + "{oops\n")
    _load(_cfg(tmp_path, f"data.train={bad}", "data.on_error=skip"), tok)
    with pytest.raises(DataError, match=r"cached encoding skipped 1 record.*invalid_json.*data.on_error=skip"):
        _load(_cfg(tmp_path, f"data.train={bad}", "data.on_error=raise"), tok)
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps({"prompt": "", "completion": f"User: hi {i} Assistant: hello"}) + "\n"
                            for i in range(20)))
    with pytest.raises(LabelAuditError):
        _load(_cfg(tmp_path, f"data.train={full}"), tok)
    with caplog.at_level("INFO"):
        data = _load(_cfg(tmp_path, f"data.train={full}", "data.policy.allow_full_sequence_loss=true"), tok)
    assert "cached encoding" in caplog.text  # allowing it needs no new encode: the audit decides on open
    assert data.meta["report"]["full_sequence_samples"] == 20


def test_lengths_slices_and_columns(tmp_path, tok):
    data = _load(_cfg(tmp_path), tok)
    ref = build_sft_dataset(str(TRAIN), tok, ChatPolicy(max_length=1024))[0]
    assert data.lengths.dtype == np.int64 and int(data.lengths.sum()) == data.meta["tokens"]
    assert_same(data[-3:], ref[-3:])
    assert data[-1].input_ids == ref[-1].input_ids
    with pytest.raises(IndexError):
        data[len(data)]
    assert set(data.column("form")) == {"messages"} and (data.column("line") == np.arange(1, 301)).all()


def test_prepare_command_builds_then_finds_the_cache(tmp_path):
    args = [f"data.cache_dir={tmp_path / 'cache'}", "--json", "--num-proc", "2"]
    first = _prepare(args)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["split"] for r in rows] == ["train", "eval"] and all(r["status"] == "built" for r in rows)
    assert rows[0]["tokens"] == 16449 and rows[0]["skipped"] == 0 and rows[0]["num_proc"] == 2
    again = _prepare(args[:-2])
    assert [json.loads(line)["status"] for line in again.stdout.splitlines()] == ["cached", "cached"]
    table = _prepare([f"data.cache_dir={tmp_path / 'cache'}"])
    assert "already cached" in table.stdout and "bytes/token" in table.stdout
    assert os.path.isdir(rows[0]["entry"])


@pytest.mark.slow
def test_data_scale_benchmark_smoke(tmp_path):
    """benchmarks/data_scale.py runs end to end at a tiny size and its JSON line holds the issue's figures."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_scale.py"), "--sizes", "20000", "40000",
                           "--keep", str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < res["tokens"]["A"] < res["tokens"]["B"]
    for key in ("encode_tokens_per_s_1proc", "encode_tokens_per_s_2proc", "cache_bytes_per_token",
                "cached_startup_s"):
        assert res[key] > 0, key
    assert res["inmemory_bytes_per_token"] >= 0  # at this size it can round to 0 (the allocator reuses freed pages)
    assert 4 <= res["cache_bytes_per_token"] <= 8
    assert all(len(v) == 2 for v in res["uss_mib_per_rank"].values())
