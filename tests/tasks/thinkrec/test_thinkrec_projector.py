"""The stage-2 projector as part of a stage's export (export/projector.safetensors + projector.json), reloaded
by path with task.options.init_projector: identical logits after the round trip, shape/CF mismatches and a
frozen random projector are ConfigErrors naming the option. (The 2-rank ZeRO-3 export and `rec eval --export`
are checked against the consolidated checkpoint in test_thinkrec_pipeline.py.)"""

import copy
import json
import shutil

import pandas as pd
import pytest
import torch

from distthink.errors import ConfigError

torch.set_num_threads(1)
DIM = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared synthetic data, two CF exports of the same shape (different vectors), a tokenizer and a batch."""
    from distthink.data.chat import ChatPolicy
    from distthink.models.inject import add_placeholder_tokens
    from distthink.models.tiny import tiny_tokenizer
    from distthink.tasks.thinkrec import prompts
    from distthink.tasks.thinkrec.cf import MF, CFConfig, CFResult, export_cf
    from distthink.tasks.thinkrec.options import ThinkRecOptions
    from distthink.tasks.thinkrec.samples import ThinkRecCollator, build_samples
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    root = tmp_path_factory.mktemp("proj")
    prep = root / "prep"
    prepare_synthetic(prep, reasons="template", n_users=20, n_items=40, min_per_user=10, max_per_user=20)
    n_u, n_i = len(pd.read_parquet(prep / "users.parquet")), len(pd.read_parquet(prep / "items.parquet"))
    cfs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        res = CFResult(model=MF(n_u, n_i, DIM), config=CFConfig(dim=DIM), best_epoch=0, valid_auc=0.5)
        cfs.append(export_cf(res, root / f"cf{seed}", prep))
    tok = tiny_tokenizer("qwen3")
    add_placeholder_tokens(tok, list(prompts.ID_TOKENS))
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(cfs[0])})
    samples = build_samples(tok, prep / "train.parquet", opt, ChatPolicy(think="drop"), seed=0, split="test",
                            reason_ratio=0.0, limit=3)
    return {"root": root, "cf": cfs, "tok": tok, "batch": ThinkRecCollator(0)(samples)}


def _base(tok):
    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=len(tok)), attn_implementation="eager").eval()


def _wrapper(world, base, **options):
    from distthink.tasks.thinkrec.model import build_wrapper
    from distthink.tasks.thinkrec.options import ThinkRecOptions

    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(world["cf"][0]), "mid_mult": 2,
                                     **options})
    return opt, build_wrapper(base, world["tok"], opt, impl="hf").eval()


def _logits_and_scores(wrapper, batch):
    from distthink.models.attention import model_inputs
    from distthink.tasks.thinkrec.model import SIDE_KEYS

    kw = model_inputs(batch, "eager", with_input_ids=False)
    with torch.no_grad():
        emb = wrapper.embed(batch["input_ids"], batch["segment_ids"], batch["user_ids"], batch["target_ids"],
                            batch["hist_ids"], batch["hist_counts"])
        logits = wrapper.model(inputs_embeds=emb, **kw).logits
        scores = wrapper(**{k: batch[k] for k in SIDE_KEYS}, **kw, return_scores=True)["scores"]
    return logits, scores


@pytest.fixture(scope="module")
def stage2_export(world):
    """A 'trained' stage-2 projector (moved away from its seed-0 init) written by save_projector_export."""
    from distthink.tasks.thinkrec.projector_export import save_projector_export

    base = _base(world["tok"])
    opt, trained = _wrapper(world, base)
    with torch.no_grad():
        for p in trained.projector.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out = world["root"] / "stage2_export"
    save_projector_export(trained.projector, out, opt)
    return out, trained, base


def test_export_holds_the_trained_tensors_and_its_shape(world, stage2_export):
    from safetensors.torch import load_file

    out, trained, _ = stage2_export
    sd = load_file(str(out / "projector.safetensors"))
    ref = trained.projector.state_dict()
    assert sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    meta = json.loads((out / "projector.json").read_text())
    want = {"d_in": DIM, "hidden_size": 64, "mult": 2, "k": 1, "activation": "relu"}
    assert {k: meta[k] for k in want} == want
    assert meta["cf_export"] == str(world["cf"][0].resolve()) and len(meta["cf_fingerprint"]) == 64


def test_reloaded_projector_gives_identical_logits_in_a_new_wrapper(world, stage2_export):
    out, trained, base = stage2_export
    want_logits, want_scores = _logits_and_scores(trained, world["batch"])
    # stage 3-like: a fresh wrapper around an identical base, projector frozen and loaded by path
    _, fresh = _wrapper(world, copy.deepcopy(base), init_projector=str(out), train_projector=False)
    assert not any(p.requires_grad for p in fresh.projector.parameters())
    logits, scores = _logits_and_scores(fresh, world["batch"])
    assert torch.equal(logits, want_logits) and torch.equal(scores, want_scores)
    # without init_projector the (seed-0) projector differs: the check above can fail
    _, untrained = _wrapper(world, copy.deepcopy(base))
    assert not torch.equal(_logits_and_scores(untrained, world["batch"])[1], want_scores)


def test_mismatches_and_a_frozen_random_projector_are_config_errors(world, stage2_export, tmp_path):
    out, _, base = stage2_export
    for bad, words in (({"mid_mult": 3}, "mult: export 2 vs this config 3"),
                       ({"proj_token_num": 2}, "k: export 1 vs this config 2")):
        with pytest.raises(ConfigError, match="init_projector") as err:
            _wrapper(world, copy.deepcopy(base), init_projector=str(out), **bad)
        assert words in str(err.value) and "Fix" in str(err.value)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(ConfigError, match=r"init_projector.*Fix: pass the train.output_dir/export"):
            _wrapper(world, copy.deepcopy(base), init_projector=str(folder))
    with pytest.raises(ConfigError, match="train_projector=false needs a trained projector. Fix"):
        _wrapper(world, copy.deepcopy(base), train_projector=False)
    with pytest.raises(ConfigError, match="uses no projector"):
        _wrapper(world, copy.deepcopy(base), prompt_mode="text", init_projector=str(out))
    # another CF space: an error for a frozen projector, a warning when it is trained further
    with pytest.raises(ConfigError, match="vectors differ.*Fix"):
        _wrapper(world, copy.deepcopy(base), init_projector=str(out), train_projector=False,
                 cf_export=str(world["cf"][1]))
    _wrapper(world, copy.deepcopy(base), init_projector=str(out), cf_export=str(world["cf"][1]))


def test_eval_picks_the_projector_from_the_export(world, stage2_export):
    from distthink.tasks.thinkrec.evaluate import projector_source
    from distthink.tasks.thinkrec.options import ThinkRecOptions

    out, _, _ = stage2_export
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(world["cf"][0])})
    assert projector_source(opt, str(out), None) == ("--export", str(out))
    assert projector_source(opt, str(out), "ckpt/model.safetensors") == ("checkpoint", "ckpt/model.safetensors")
    frozen = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(world["cf"][0]),
                                        "init_projector": str(out), "train_projector": False})
    assert projector_source(frozen, None, None) == ("task.options.init_projector", str(out))
    with pytest.raises(ConfigError, match="needs the trained projector. Fix: pass --export"):
        projector_source(opt, str(world["root"]), None)  # trained, no projector in the folder given


def test_seed_defaults_relu_mid_mult_5_and_the_old_option_name(world, caplog):
    """ThinkRec's projector: Linear(d, 5d) -> ReLU -> Linear(5d, hidden*k); `projector_mult` still accepted (one
    warning line) for one release and mapped to mid_mult."""
    import logging

    from distthink.tasks.thinkrec.options import ThinkRecOptions

    base = _base(world["tok"])
    opt = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(world["cf"][0])})
    assert (opt.mid_mult, opt.activation) == (5, "relu")
    from distthink.tasks.thinkrec.model import build_wrapper

    p = build_wrapper(copy.deepcopy(base), world["tok"], opt, impl="hf").projector
    assert isinstance(p.net[1], torch.nn.ReLU) and p.net[0].out_features == 5 * DIM
    x = torch.randn(3, DIM)
    by_hand = torch.relu(x @ p.net[0].weight.T + p.net[0].bias) @ p.net[2].weight.T + p.net[2].bias
    assert torch.allclose(p(x).reshape(3, -1), by_hand, atol=1e-6)
    from distthink import config

    config._warned.discard("task.options.projector_mult")  # one line per process: make this test see it
    with caplog.at_level(logging.WARNING):
        old = ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(world["cf"][0]), "projector_mult": 7})
    assert old.mid_mult == 7 and "projector_mult' is deprecated" in caplog.text
    with pytest.raises(ConfigError, match="activation='tanh'.*Fix"):
        ThinkRecOptions.from_dict({"activation": "tanh"})


def test_activation_is_recorded_and_checked_on_reload(world, stage2_export, tmp_path):
    out, _, base = stage2_export
    with pytest.raises(ConfigError, match="activation: export relu vs this config gelu.*Fix"):
        _wrapper(world, copy.deepcopy(base), init_projector=str(out), activation="gelu")
    # an export written before the activation was recorded holds a GELU projector: read as such
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    meta = json.loads((legacy / "projector.json").read_text())
    del meta["activation"]
    (legacy / "projector.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="activation: export gelu vs this config relu"):
        _wrapper(world, copy.deepcopy(base), init_projector=str(legacy))
    _wrapper(world, copy.deepcopy(base), init_projector=str(legacy), activation="gelu")
