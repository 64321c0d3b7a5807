"""ThinkRec task: prompts, per-sample mixing of the dual objective, CF injection, mixed sampling.

References are independent: per-sample forwards with full logits, an explicit log-softmax gather for the LM
term and the log-sigmoid formula for the BCE, summed by hand with the mixing weights.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol

from distthink.data.chat import ChatPolicy
from distthink.errors import ConfigError, DistthinkError
from distthink.models.inject import Projector, add_placeholder_tokens
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.model import ThinkRecModel
from distthink.tasks.thinkrec.options import ThinkRecOptions
from distthink.tasks.thinkrec.samples import ThinkRecCollator, build_samples, verdict_ids

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from distthink.tasks.thinkrec.cf import MF, CFConfig, CFResult, export_cf
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    out = tmp_path_factory.mktemp("prep")
    prepare_synthetic(out, reasons="template", n_users=40, n_items=60, min_per_user=10, max_per_user=30)
    n_u, n_i = len(pd.read_parquet(out / "users.parquet")), len(pd.read_parquet(out / "items.parquet"))
    torch.manual_seed(0)  # an (untrained) MF export: id prompts need the CF source of the data
    export_cf(CFResult(model=MF(n_u, n_i, 8), config=CFConfig(dim=8), best_epoch=0, valid_auc=0.5), out / "cf", out)
    return out


@pytest.fixture(scope="module")
def tok():
    from distthink.models.tiny import tiny_tokenizer

    t = tiny_tokenizer("qwen3")
    add_placeholder_tokens(t, list(prompts.ID_TOKENS))
    return t


def _model(tok):
    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=len(tok)), attn_implementation="eager").eval()


def _samples(tok, prepared, mode="text", n=40, ratio=0.5, seed=0, **kw):
    opt = ThinkRecOptions.from_dict({"prompt_mode": mode, "reason_ratio": ratio,
                                     **({"cf_export": str(prepared / "cf")} if mode == "ids" else {}), **kw})
    return opt, build_samples(tok, prepared / "train.parquet", opt, ChatPolicy(think="drop"), seed=seed,
                              split="train", limit=n)


def test_options_are_validated_with_a_fix():
    for bad in ({"nope": 1}, {"rec_score": "max"}, {"alpha": -1}, {"prompt_mode": "ids"}, {"reason_ratio": 2},
                {"prompt_mode": "text", "template": "User <UserID> likes <TargetItemTitle>?"}):
        with pytest.raises(ConfigError, match="Fix"):
            ThinkRecOptions.from_dict(bad)


def test_prompts_render_id_tokens_only_in_ids_mode_and_record_the_verdict_row(tok, prepared):
    ids = {t: tok.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    yes, no = verdict_ids(tok, ThinkRecOptions())
    for mode in ("text", "ids"):
        _, samples = _samples(tok, prepared, mode, n=30)
        for s in samples:
            arr = np.asarray(s.input_ids)
            n_hist = len(s.meta["history_ids"])
            assert (arr == ids["<UserID>"]).sum() == (mode == "ids")
            assert (arr == ids["<TargetItemID>"]).sum() == (mode == "ids")
            assert (arr == ids["<ItemID>"]).sum() == n_hist
            # the hidden state at answer_row predicts the verdict token, which is learned
            r = s.meta["answer_row"]
            assert arr[r + 1] == (yes if s.meta["label"] else no) and s.labels[r + 1] == arr[r + 1]
            text = tok.decode(s.input_ids)
            assert "Answer Yes or No." in text
            if s.meta["rec_type"] == "reasoning":
                assert "because" in tok.decode(s.input_ids[r + 1:])
            else:
                assert "because" not in tok.decode(s.input_ids[r + 1:])
        if mode == "ids":
            assert any(len(s.meta["history_ids"]) for s in samples)


def test_reasoning_mix_is_deterministic_per_seed_and_follows_the_ratio(tok, prepared):
    kinds = lambda ss: [s.meta["rec_type"] for s in ss]  # noqa: E731
    _, a = _samples(tok, prepared, n=200, ratio=0.2, seed=3)
    _, b = _samples(tok, prepared, n=200, ratio=0.2, seed=3)
    _, c = _samples(tok, prepared, n=200, ratio=0.2, seed=4)
    assert kinds(a) == kinds(b) and kinds(a) != kinds(c)
    share = kinds(a).count("reasoning") / len(a)
    assert 0.12 < share < 0.28, share
    for s in a:
        assert (s.meta["lm_mult"], s.meta["rec_coef"]) == ((0.9, 0.1) if s.meta["rec_type"] == "reasoning"
                                                           else (0.1, 0.9))


def _reference(model, samples, yes, no, mode="yes"):
    """Per-sample forwards, full logits, explicit formulas: (sum_s b_s LM_s, sum_s a_s BCE_s)."""
    lm_total, rec_total = 0.0, 0.0
    for s in samples:
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        lab, w = torch.tensor(s.labels), torch.tensor(s.loss_weights, dtype=torch.float64)
        logp = torch.log_softmax(logits, -1)
        lm = sum(-logp[t - 1, lab[t]] * w[t] for t in range(1, len(lab)) if lab[t] != -100)
        r = s.meta["answer_row"]
        z = logits[r, yes] - (logits[r, no] if mode == "yes_minus_no" else 0.0)
        y = s.meta["label"]
        bce = -(y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z))
        lm_total += s.meta["lm_mult"] * float(lm)
        rec_total += s.meta["rec_coef"] * float(bce)
    return lm_total, rec_total


@pytest.mark.parametrize("impl,score", [("fused", "yes"), ("hf", "yes_minus_no")])
def test_mixed_batch_loss_equals_the_per_sample_sum_by_hand(tok, prepared, impl, score):
    from distthink.models.attention import model_inputs

    model = _model(tok)
    _, samples = _samples(tok, prepared, n=40, ratio=0.5)
    batch_s = [s for s in samples if s.meta["rec_type"] == "reasoning"][:2] + \
        [s for s in samples if s.meta["rec_type"] == "label"][:3]
    assert {s.meta["label"] for s in batch_s} == {0, 1}
    yes, no = verdict_ids(tok, ThinkRecOptions())
    wrapper = ThinkRecModel(model, yes_id=yes, no_id=no, rec_score=score, impl=impl, chunk_size=64)
    batch = ThinkRecCollator(0)(batch_s)
    from distthink.tasks.thinkrec.model import SIDE_KEYS

    with torch.no_grad():
        out = wrapper(**{k: batch[k] for k in SIDE_KEYS}, **model_inputs(batch, "eager", with_input_ids=False))
    ref_lm, ref_rec = _reference(model, batch_s, yes, no, score)
    # packed vs per-sample fp32 forwards of the tiny decoder; both sums have positive terms (no cancellation)
    rel = fp_tol(torch.float32, 1.0, k=TINY_DECODER_K)
    assert float(out["lm"]) == pytest.approx(ref_lm, rel=rel)
    assert float(out["rec"]) == pytest.approx(ref_rec, rel=rel)
    # normalised: each key by its own (unmixed) total
    W = sum(sum(w for w, lab in zip(s.loss_weights[1:], s.labels[1:]) if lab != -100) for s in batch_s)
    assert batch["target_weight_sum"] == pytest.approx(W)  # float32-stored weights: <= eps32/2 relative, < 1e-6
    assert batch["rec_rows"].numel() == len(batch_s)


def _id_batch(tok, prepared, n=3):
    _, samples = _samples(tok, prepared, "ids", n=60, ratio=0.0)
    chosen, users = [], set()
    for s in samples:  # distinct users, at least one with history
        if s.meta["user_id"] not in users and (chosen or s.meta["history_ids"]):
            chosen.append(s)
            users.add(s.meta["user_id"])
        if len(chosen) == n:
            break
    return chosen


def _id_wrapper(tok, prepared, *, cf_seed: int, **kw):
    """A ThinkRecModel over the tiny model with a random projector and random CF tables (id prompts), in eval mode,
    and a collated batch of distinct users' samples. Returns (model, wrapper, samples, batch)."""
    model = _model(tok)
    samples = _id_batch(tok, prepared)
    yes, no = verdict_ids(tok, ThinkRecOptions())
    ph = {t: tok.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    g = torch.Generator().manual_seed(cf_seed)
    users, items = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
    torch.manual_seed(0)
    wrapper = ThinkRecModel(model, yes_id=yes, no_id=no, projector=Projector(8, 64, mult=2), user_table=users,
                            item_table=items, ph_ids=ph, **kw).eval()
    return model, wrapper, samples, ThinkRecCollator(0)(samples)


def test_changing_one_users_cf_vector_changes_only_that_prompt(tok, prepared):
    from distthink.models.attention import model_inputs
    from distthink.tasks.thinkrec.model import SIDE_KEYS

    model, wrapper, samples, batch = _id_wrapper(tok, prepared, cf_seed=0, impl="hf")
    ph = wrapper.ph_ids
    kw = model_inputs(batch, "eager", with_input_ids=False)
    side = {k: batch[k] for k in SIDE_KEYS}

    def run():
        with torch.no_grad():
            emb = wrapper.embed(batch["input_ids"], batch["segment_ids"], batch["user_ids"], batch["target_ids"],
                                batch["hist_ids"], batch["hist_counts"])
            logits = model(inputs_embeds=emb, **kw).logits[0]
            scores = wrapper(**side, **kw, return_scores=True)["scores"]
        return logits, scores

    before_logits, before_scores = run()
    target = int(batch["user_ids"][1])
    wrapper.user_table[target] += 1.0
    after_logits, after_scores = run()
    seg = batch["segment_ids"][0]
    # other samples' rows are bit-identical (no path between samples); 1e-6 (~10 ulps of these logits) only
    # tolerates a kernel that is not, while the changed rows move by O(1)
    changed = (after_logits - before_logits).abs().amax(-1) > 1e-6
    assert changed[seg == 1].any()
    assert not changed[seg != 1].any()
    assert (after_scores != before_scores).tolist() == [False, True, False]
    # the <UserID> row itself (and everything after it in the sample) is where the change starts
    first = int(torch.nonzero(changed)[0])
    assert int(batch["input_ids"][0, first]) == ph["<UserID>"]

    # a placeholder count mismatch names the sample
    bad = dict(side)
    ids = batch["input_ids"].clone()
    pos = torch.nonzero(ids[0] == ph["<ItemID>"])[0]
    ids[0, pos] = tok.convert_tokens_to_ids("a") if tok.convert_tokens_to_ids("a") is not None else 64
    bad["input_ids"] = ids
    with pytest.raises(DistthinkError, match=r"sample \d"):
        wrapper(**bad, **kw)


def test_k_tokens_per_id_are_rendered(tok, prepared):
    _, samples = _samples(tok, prepared, "ids", n=10, ratio=0.0, proj_token_num=2)
    uid = tok.convert_tokens_to_ids("<UserID>")
    assert all(np.sum(np.asarray(s.input_ids) == uid) == 2 for s in samples)


def test_bce_definition():
    from distthink.tasks.thinkrec.model import rec_bce_sum

    z, y, c = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.1, 0.9])
    want = 0.1 * math.log(1 + math.exp(-2.0)) + 0.9 * math.log(1 + math.exp(1.0))
    assert float(rec_bce_sum(z, y, c)) == pytest.approx(want, rel=fp_tol(torch.float32, 1.0, k=2))  # 2 fp32 terms


def test_eval_loads_the_trained_projector_from_a_checkpoint_file(tmp_path, tok):
    from safetensors.torch import save_file

    from distthink.tasks.thinkrec.evaluate import load_projector

    yes, no = verdict_ids(tok, ThinkRecOptions())
    torch.manual_seed(1)
    trained = Projector(8, 64, mult=2)
    save_file({f"projector.{k}": v.contiguous() for k, v in trained.state_dict().items()} |
              {"model.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(2)
    fresh = ThinkRecModel(_model(tok), yes_id=yes, no_id=no, projector=Projector(8, 64, mult=2),
                          user_table=torch.zeros(2, 8), item_table=torch.zeros(2, 8))
    x = torch.randn(3, 8)
    assert not torch.equal(fresh.projector(x), trained(x))
    load_projector(fresh, str(tmp_path / "model.safetensors"))
    assert torch.equal(fresh.projector(x), trained(x))
    save_file({"model.x": torch.zeros(1)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(ConfigError, match="Fix"):
        load_projector(fresh, str(tmp_path / "none.safetensors"))


@pytest.mark.parametrize("rec_score", ["yes", "yes_minus_no"])
def test_eval_score_path_equals_the_training_forward_and_the_full_logits(tok, prepared, rec_score):
    """ThinkRecModel.score (eval: answer rows x 2 verdict rows, no vocabulary logits) against the training forward
    and against an independent read of the HF model's full logits at the answer rows."""
    from distthink.models.attention import model_inputs
    from distthink.tasks.thinkrec.model import SCORE_KEYS, SIDE_KEYS

    model, wrapper, samples, batch = _id_wrapper(tok, prepared, cf_seed=1, impl="fused", rec_score=rec_score)
    yes, no = wrapper.yes_id, wrapper.no_id
    kw = model_inputs(batch, "eager", with_input_ids=False)
    with torch.no_grad():
        fast = wrapper.score(**{k: batch[k] for k in SCORE_KEYS}, **kw)
        train = wrapper(**{k: batch[k] for k in SIDE_KEYS}, **kw, return_scores=True)["scores"]
        emb = wrapper.embed(batch["input_ids"], batch["segment_ids"], batch["user_ids"], batch["target_ids"],
                            batch["hist_ids"], batch["hist_counts"])
        logits = model(inputs_embeds=emb, **kw).logits.reshape(-1, model.config.vocab_size)[batch["rec_rows"]]
    ref = logits[:, yes] - logits[:, no] if rec_score == "yes_minus_no" else logits[:, yes]
    assert fast.shape == (len(samples),)
    # fp32 tiny-decoder forwards through other kernels (row subsets of the head), scaled by |yes| (+ |no|) logits
    mag = logits[:, yes].abs() + (logits[:, no].abs() if rec_score == "yes_minus_no" else 0)
    tol = fp_tol(torch.float32, mag.max(), k=TINY_DECODER_K)
    torch.testing.assert_close(fast, train, rtol=0, atol=tol)
    torch.testing.assert_close(fast, ref.float(), rtol=0, atol=tol)
    assert fast.std() > 0  # distinct prompts, distinct scores: the comparison is not between constants
