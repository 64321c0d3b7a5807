"""CF vectors for injection from every source `task.options.cf_export` accepts (cf_source.py): a DIN export
(target-aware per-row user vectors), .npz shards keyed by id, inline row vectors (JSON lists or base64 float32).
Each is checked where it reaches the decoder: the rows of `inputs_embeds` at the placeholders equal the projector
applied to the vectors computed here independently. Bad vectors are DataErrors naming file, line, field and fix,
or skipped and counted with on_error=skip."""

import base64

import numpy as np
import pandas as pd
import pytest
import torch

from distthink.data.chat import ChatPolicy
from distthink.errors import ConfigError, DataError
from distthink.models.inject import add_placeholder_tokens
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.options import ThinkRecOptions
from distthink.tasks.thinkrec.samples import ThinkRecCollator, build_samples

torch.set_num_threads(1)
DIM = 8
N = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from distthink.models.tiny import tiny_tokenizer
    from distthink.tasks.thinkrec.cf import CFConfig, export_cf, load_split, train_cf
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    root = tmp_path_factory.mktemp("cfsrc")
    prep = root / "prep"
    prepare_synthetic(prep, reasons="template", n_users=30, n_items=50, min_per_user=10, max_per_user=20)
    n_u, n_i = len(pd.read_parquet(prep / "users.parquet")), len(pd.read_parquet(prep / "items.parquet"))
    s = {k: load_split(prep / f"{k}.parquet", n_i, 10) for k in ("train", "valid")}
    res = train_cf(s["train"], s["valid"], n_u, n_i, CFConfig(model="din", dim=DIM, max_epochs=1, progress=False))
    export_cf(res, root / "din", prep)
    tok = tiny_tokenizer("qwen3")
    add_placeholder_tokens(tok, list(prompts.ID_TOKENS))
    df = pd.read_parquet(prep / "train.parquet").iloc[:N].reset_index(drop=True)
    df = df[df["history_item_ids"].map(len) > 0].reset_index(drop=True)  # rows with a history to inject
    return {"root": root, "prep": prep, "tok": tok, "df": df, "n_u": n_u, "n_i": n_i, "model": res.model}


def _wrapper_embeds(world, opt, path):
    """(samples, batch, inputs_embeds, projector) through build_samples + the collator + the real wrapper."""
    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config
    from distthink.tasks.thinkrec.model import build_wrapper

    samples = build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="test",
                            reason_ratio=0.0)
    batch = ThinkRecCollator(0)(samples)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=len(world["tok"])),
                                            attn_implementation="eager").eval()
    w = build_wrapper(base, world["tok"], opt, impl="hf").eval()
    vecs = {k: batch[k] for k in ("user_vecs", "target_vecs", "hist_vecs") if k in batch}
    with torch.no_grad():
        emb = w.embed(batch["input_ids"], batch["segment_ids"], batch["user_ids"], batch["target_ids"],
                      batch["hist_ids"], batch["hist_counts"], **vecs)
    return samples, batch, emb, w.projector


def _at(batch, emb, tok, name):
    """The injected rows of placeholder `name`, sample-major in order of appearance (packed rows)."""
    tid = tok.convert_tokens_to_ids(name)
    flat_ids, flat_seg = batch["input_ids"].reshape(-1), batch["segment_ids"].reshape(-1)
    pos = torch.nonzero(flat_ids == tid).flatten()
    pos = pos[torch.sort(flat_seg[pos], stable=True).indices]
    return emb.reshape(-1, emb.shape[-1])[pos]


def _check_injected(world, batch, emb, proj, user, target, hist):
    tok = world["tok"]
    with torch.no_grad():
        for name, vec in ((prompts.USER_ID, user), (prompts.TARGET_ITEM_ID, target), (prompts.ITEM_ID, hist)):
            want = proj(torch.as_tensor(np.asarray(vec), dtype=torch.float32))[:, 0]
            torch.testing.assert_close(_at(batch, emb, tok, name), want)


def test_din_rows_get_target_aware_user_vectors(world):
    from distthink.tasks.thinkrec.cf import split_from_frame

    path = world["root"] / "rows.parquet"
    df = world["df"]
    # the same rows twice, the copy with other targets: same user and history, another target
    other = df.copy()
    other["item_id"] = (other["item_id"] + 7) % world["n_i"]
    pd.concat([df, other], ignore_index=True).to_parquet(path, index=False)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(world["root"] / "din")})
    samples, batch, emb, proj = _wrapper_embeds(world, opt, path)
    both = pd.read_parquet(path)
    sp = split_from_frame(both, world["n_i"], 10)
    m = world["model"].eval()
    with torch.no_grad():  # the trained DIN itself, on each row's (user, target, last 10 history items)
        user = m.encode_user(sp.user, sp.item, sp.hist_items, sp.hist_labels, sp.hist_mask)
        items = m.item.weight[: world["n_i"]]
    hist = items[torch.as_tensor(np.concatenate(both["history_item_ids"].to_numpy()))]
    _check_injected(world, batch, emb, proj, user, items[sp.item], hist)
    n = len(df)
    assert torch.equal(batch["user_ids"][:n], batch["user_ids"][n:])
    assert (batch["user_vecs"][:n] - batch["user_vecs"][n:]).abs().amax(1).min() > 1e-6


def _write_shards(root, world, user_ids, item_ids, rng, d=DIM, override=None):
    root.mkdir(parents=True, exist_ok=True)
    user_emb = rng.normal(size=(len(user_ids), d)).astype(np.float32)
    item_emb = rng.normal(size=(len(item_ids), d)).astype(np.float32)
    half = len(item_ids) // 2
    a = {"user_ids": np.asarray(user_ids), "user_emb": user_emb, "item_ids": np.asarray(item_ids[:half]),
         "item_emb": item_emb[:half]}
    b = {"item_ids": np.asarray(item_ids[half:]), "item_emb": item_emb[half:]}
    a.update(override or {})
    np.savez(root / "part-0.npz", **a)
    np.savez(root / "part-1.npz", **b)
    return dict(zip(user_ids, user_emb)), dict(zip(item_ids, item_emb))


def test_npz_shards_keyed_by_id(world, tmp_path):
    rng = np.random.default_rng(0)
    users, items = _write_shards(tmp_path / "shards", world, list(range(world["n_u"])), list(range(world["n_i"])),
                                 rng)
    path = tmp_path / "rows.parquet"
    world["df"].to_parquet(path, index=False)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(tmp_path / "shards")})
    _, batch, emb, proj = _wrapper_embeds(world, opt, path)
    df = world["df"]
    _check_injected(world, batch, emb, proj, [users[u] for u in df["user_id"]], [items[i] for i in df["item_id"]],
                    [items[i] for h in df["history_item_ids"] for i in h])


def test_npz_errors_name_the_file_and_field(world, tmp_path):
    from distthink.tasks.thinkrec.cf_source import open_cf_source

    rng = np.random.default_rng(1)
    df = world["df"]
    path = tmp_path / "rows.parquet"
    df.to_parquet(path, index=False)
    missing_user = int(df["user_id"].iloc[2])
    users = [u for u in range(world["n_u"]) if u != missing_user]
    _write_shards(tmp_path / "holes", world, users, list(range(world["n_i"])), rng)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(tmp_path / "holes")})
    with pytest.raises(DataError, match=rf"rows.parquet, line 3, field 'user_id': id {missing_user} has no CF "
                                        r"vector.*Fix"):
        build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train")
    kept = build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train", on_error="skip")
    assert len(kept) == len(df) - int((df["user_id"] == missing_user).sum())
    assert missing_user not in [s.meta["user_id"] for s in kept]
    for name, kw, words in (("nan", {"user_emb": np.full((3, DIM), np.nan, np.float32), "user_ids": np.arange(3)},
                             "NaN/Inf"),
                            ("dim", {"user_emb": np.ones((3, DIM + 1), np.float32), "user_ids": np.arange(3)},
                             "different dimensions"),
                            ("dup", {"user_emb": np.ones((2, DIM), np.float32), "user_ids": np.array([4, 4])},
                             "more than once")):
        _write_shards(tmp_path / name, world, [0], list(range(world["n_i"])), rng, override=kw)
        with pytest.raises(DataError, match=words) as err:
            open_cf_source(str(tmp_path / name))
        assert "Fix" in str(err.value) and name in str(err.value)  # names the shard file / folder
    with pytest.raises(ConfigError, match="neither a `rec train-cf` folder.*Fix"):
        ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(tmp_path)})


def _b64(v):
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def _inline(df, rng, encode, with_history=True):
    out = df.copy()
    out["User_emb"] = [encode(rng.normal(size=DIM)) for _ in range(len(df))]
    out["TargetItem_emb"] = [encode(rng.normal(size=DIM)) for _ in range(len(df))]
    if with_history:
        out["History_embs"] = [[encode(rng.normal(size=DIM)) for _ in h] for h in df["history_item_ids"]]
    return out


def _decode(v):
    return np.frombuffer(base64.b64decode(v), "<f4") if isinstance(v, str) else np.asarray(v, np.float32)


@pytest.mark.parametrize("form", ["json", "base64"])
def test_inline_vectors_as_thinkrec_records(world, tmp_path, form):
    rng = np.random.default_rng(2)
    encode = (lambda v: [float(x) for x in np.float32(v)]) if form == "json" else _b64
    rows = _inline(world["df"], rng, encode)
    path = tmp_path / "rows.jsonl"
    rows.to_json(path, orient="records", lines=True)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": "inline"})
    _, batch, emb, proj = _wrapper_embeds(world, opt, path)
    _check_injected(world, batch, emb, proj, [_decode(v) for v in rows["User_emb"]],
                    [_decode(v) for v in rows["TargetItem_emb"]],
                    [_decode(v) for h in rows["History_embs"] for v in h])
    # without a History_embs column the history is listed by title only: no <ItemID> token to fill
    path2 = tmp_path / "no_hist.jsonl"
    _inline(world["df"], rng, encode, with_history=False).to_json(path2, orient="records", lines=True)
    samples, batch, emb, proj = _wrapper_embeds(world, opt, path2)
    item_tok = world["tok"].convert_tokens_to_ids(prompts.ITEM_ID)
    assert all(item_tok not in s.input_ids for s in samples) and batch["hist_vecs"].shape == (0, DIM)


def test_inline_errors_name_line_and_field_or_are_counted(world, tmp_path):
    rng = np.random.default_rng(3)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": "inline"})
    base = _inline(world["df"], rng, lambda v: [float(x) for x in v])
    cases = {
        "nan": ("User_emb", [float("nan")] * DIM, "NaN or Inf"),
        "dim": ("TargetItem_emb", [0.5] * (DIM - 1), "dimension 7, but earlier vectors have 8"),
        "b64": ("User_emb", "not base64!", "not valid base64"),
        "hist": ("History_embs", [], "History_embs holds 0 vectors for"),
    }
    for name, (field, value, words) in cases.items():
        rows = base.copy()
        rows[field] = rows[field].astype(object)
        rows.at[3, field] = value
        path = tmp_path / f"{name}.jsonl"
        rows.to_json(path, orient="records", lines=True)
        with pytest.raises(DataError, match=rf"{name}.jsonl, line 4, field '{field}': {words}.*Fix"):
            build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train")
        kept = build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train",
                             on_error="skip")
        assert [s.meta["index"] for s in kept] == [i for i in range(len(rows)) if i != 3]
    with pytest.raises(DataError, match="no User_emb / TargetItem_emb column.*Fix"):
        world["df"].to_json(tmp_path / "plain.jsonl", orient="records", lines=True)
        build_samples(world["tok"], tmp_path / "plain.jsonl", opt, ChatPolicy(think="drop"), seed=0, split="train")


def test_rec_group_clusters_npz_user_vectors(world, tmp_path):
    from distthink.tasks.thinkrec.grouping import GroupConfig, group_users, load_groups

    rng = np.random.default_rng(4)
    users = list(range(0, world["n_u"], 2))  # every other user has a vector
    vec, _ = _write_shards(tmp_path / "shards", world, users, list(range(world["n_i"])), rng)
    summary = group_users(tmp_path / "shards", tmp_path / "groups", GroupConfig(n_groups=2, plots=False))
    g = load_groups(tmp_path / "groups")
    assert g["table"]["user_id"].tolist() == users and summary["cf_model"] == "npz"
    # the raw group means are the means of the members' shard vectors
    for k in range(2):
        members = g["table"]["user_id"][g["table"]["group"] == k]
        np.testing.assert_allclose(g["centroids_raw"][k].numpy(), np.mean([vec[u] for u in members], 0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("source,nproc", [("din", 2), ("inline", 1)])
def test_stage2_trains_on_per_row_vectors(world, tmp_path, source, nproc):
    """Stage 2 (id prompts, projector trained) end to end through the trainer with per-row vectors in the batch:
    DIN's target-aware user vectors on 2 ranks under ZeRO-3, inline JSON vectors on one process."""
    import json

    from _train_utils import launch, metrics
    from safetensors.torch import load_file

    prep = tmp_path / "prep"
    prep.mkdir()
    train = pd.read_parquet(world["prep"] / "train.parquet").iloc[:24]
    if source == "inline":
        _inline(train, np.random.default_rng(5), lambda v: [float(x) for x in v]).to_json(
            prep / "train.jsonl", orient="records", lines=True)
        data, cf = prep / "train.jsonl", "inline"
    else:
        train.to_parquet(prep / "train.parquet", index=False)
        data, cf = prep / "train.parquet", str(world["root"] / "din")
    out = tmp_path / "run"
    launch(["--config", "configs/thinkrec/smoke.yaml", f"data.train={data}", "data.eval=null",
            f"train.output_dir={out}", "task.options.prompt_mode=ids", f"task.options.cf_export={cf}",
            "task.options.freeze_lora=true", "train.max_steps=2", "batch.samples_per_micro=4", "train.lr=1e-2",
            *(["distributed.deepspeed=ds_configs/zero3.json"] if nproc > 1 else [])], nproc=nproc)
    rows = metrics(out)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    meta = json.loads((out / "export" / "projector.json").read_text())
    assert meta["d_in"] == DIM and (meta["cf_fingerprint"] is None) == (source == "inline")
    torch.manual_seed(0)  # build_wrapper's init: the exported projector moved away from it
    from distthink.models.inject import Projector

    init = Projector(DIM, 64, mult=5, activation="relu").state_dict()
    assert not torch.equal(load_file(str(out / "export" / "projector.safetensors"))["net.0.weight"],
                           init["net.0.weight"])


def _cached(world, tmp_path, opt, path, on_error="raise", num_proc=1):
    """The split as the trainer reads it: streamed through split_encoding into the encoded-data cache."""
    from distthink.config import load_config
    from distthink.engine import batching
    from distthink.tasks.thinkrec.samples import split_encoding

    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false",
                             f"data.on_error={on_error}", f"data.num_proc={num_proc}"])
    enc = split_encoding(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train")
    return batching.open_encoding(cfg, enc, world["tok"], "test split")


def _assert_same_samples(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.input_ids == b.input_ids and a.labels == b.labels and a.meta["index"] == b.meta["index"]
        for key in ("cf_user", "cf_target", "cf_hist"):
            assert (key in a.meta) == (key in b.meta), key
            if key in b.meta:  # float32 vectors stored as float64: exact
                assert a.meta[key].dtype == np.float32 and np.array_equal(a.meta[key], b.meta[key]), key


@pytest.mark.parametrize("source", ["din", "inline", "inline_no_history"])
def test_the_cache_streams_the_same_vectors_as_build_samples(world, tmp_path, monkeypatch, source):
    """What training reads (rows validated and encoded chunk by chunk, vectors stored in the cache) equals the
    in-memory build_samples, vectors included; chunks of 5 rows put chunk borders inside the split."""
    from distthink.tasks.thinkrec import samples as samples_mod

    monkeypatch.setattr(samples_mod, "CF_CHUNK_ROWS", 5)
    if source == "din":
        path, spec = tmp_path / "rows.parquet", str(world["root"] / "din")
        world["df"].to_parquet(path, index=False)
    else:
        path, spec = tmp_path / "rows.jsonl", "inline"
        rows = _inline(world["df"], np.random.default_rng(4), _b64, with_history=source == "inline")
        rows.to_json(path, orient="records", lines=True)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": spec})
    ref = build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train")
    got = _cached(world, tmp_path, opt, path, num_proc=2)
    _assert_same_samples(got, ref)
    assert "cf_user" in got[0].meta and ("cf_hist" in got[0].meta) == source.startswith("inline")


def test_the_cache_names_the_line_of_a_bad_vector_or_counts_it(world, tmp_path, monkeypatch):
    from distthink.tasks.thinkrec import samples as samples_mod

    monkeypatch.setattr(samples_mod, "CF_CHUNK_ROWS", 3)  # line 7 sits in the third chunk
    df = pd.concat([world["df"]] * 3, ignore_index=True)  # 15 rows
    rows = _inline(df, np.random.default_rng(5), lambda v: [float(x) for x in v])
    rows["User_emb"] = rows["User_emb"].astype(object)
    rows.at[6, "User_emb"] = [float("nan")] * DIM
    path = tmp_path / "bad.jsonl"
    rows.to_json(path, orient="records", lines=True)
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": "inline"})
    with pytest.raises(DataError, match=r"bad.jsonl, line 7, field 'User_emb': NaN or Inf.*Fix"):
        _cached(world, tmp_path / "a", opt, path)
    got = _cached(world, tmp_path / "b", opt, path, on_error="skip")
    ref = build_samples(world["tok"], path, opt, ChatPolicy(think="drop"), seed=0, split="train", on_error="skip")
    _assert_same_samples(got, ref)
    assert [s.meta["index"] for s in got] == [i for i in range(len(rows)) if i != 6]
    assert got.meta["report"]["skipped"] == {"cf_not_finite": 1}
