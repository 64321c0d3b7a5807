"""`distthink rec explain` on a tiny stage-3 export with id prompts (CF vectors injected through a stage-2
projector, three perturbed experts + the global adapter, the entropy gate of molora.json):

- the Yes-probability read from the first generated position equals sigmoid of `rec eval --fusion`'s score of the
  same row and mode, and the gate branch equals its gate_branch column;
- greedy texts equal an independent greedy loop (full forward per step, no KV cache, embeddings injected by the
  wrapper, one gate row per prompt), and a padded batch gives the texts of prompts run alone;
- 2 ranks under ZeRO-3 (DeepSpeed on CPU, gloo, lockstep generation) give the records of 1 process;
- the metrics (agreement, BLEU-4 / ROUGE-L / METEOR of the reasons) against hand computations.
"""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from _thinkrec_inputs import write_adapter
from _train_utils import ROOT, env, free_port
from test_thinkrec_fusion_eval import _cli

torch.set_num_threads(1)
LIMIT = 6


@pytest.fixture(scope="module")
def stage3_ids(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from distthink.config import load_config
    from distthink.models.inject import Projector
    from distthink.models.load import build_model_config, load_tokenizer
    from distthink.models.molora import apply_molora, molora_layers
    from distthink.models.molora_export import export_molora
    from distthink.tasks.thinkrec.gate import EntropyGate, GateConfig
    from distthink.tasks.thinkrec.options import ThinkRecOptions
    from distthink.tasks.thinkrec.projector_export import save_projector_export
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic
    from distthink.tasks.thinkrec.task import ThinkRecTask

    root = tmp_path_factory.mktemp("explain")
    prep, cf, groups, export = root / "prep", root / "cf", root / "groups", root / "export"
    prepare_synthetic(prep, reasons="template", n_users=20, n_items=40, min_per_user=10, max_per_user=20)
    _cli("train-cf", "--data", str(prep), "--out", str(cf), "--epochs", "2", "--dim", "16", "--no-progress")
    _cli("group", "--cf", str(cf), "--out", str(groups), "--n-groups", "2", "--no-plots")
    write_adapter(root / "stage1")
    torch.manual_seed(3)  # a "trained" stage-2 projector: injected vectors far from zero
    proj = Projector(16, 64, mult=5, activation="relu")
    save_projector_export(proj, export, ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(cf)}))
    overrides = [f"task.options.cf_export={cf}", f"task.options.molora.groups_dir={groups}",
                 f"task.options.molora.init_adapter={root / 'stage1'}", "task.options.molora.gate=soft",
                 "task.options.prompt_mode=ids", f"task.options.init_projector={export}",
                 "task.options.train_projector=false"]
    cfg = load_config("configs/thinkrec/stage3_smoke.yaml", overrides)
    tok = load_tokenizer(cfg)
    ThinkRecTask(cfg).prepare_tokenizer(tok)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(build_model_config(cfg, tok))
    base.save_pretrained(str(export))
    model = apply_molora(base, 2, init_from_peft_adapter=str(root / "stage1"))
    g = torch.Generator().manual_seed(1)
    for layer in molora_layers(model).values():
        for e in range(3):
            a, b = layer.adapter_weights(e)
            layer.set_adapter_weights(e, a + 0.5 * torch.randn(a.shape, generator=g),
                                      b + 0.5 * torch.randn(b.shape, generator=g))
    gate = EntropyGate.from_groups(groups, GateConfig(tau=0.5, expert_margin=0.1, entropy_frac=0.9))
    export_molora(model, export / "molora", gate=gate, groups_dir=groups)
    return {"root": root, "prep": prep, "cf": cf, "export": export, "overrides": overrides, "cfg": cfg}


def _cfg(w):
    from distthink.config import load_config

    return load_config("configs/thinkrec/stage3_smoke.yaml", w["overrides"])


def _explain(w, mode, **gen):
    from distthink.inference.generate import GenerationOptions
    from distthink.tasks.thinkrec.explain import explain_split

    opts = GenerationOptions(**{"max_new_tokens": 8, "batch_size": 4, **gen})
    return explain_split(_cfg(w), str(w["prep"] / "test.parquet"), export=str(w["export"]), mode=mode, gen=opts,
                         limit=LIMIT)


@pytest.mark.parametrize("mode", ["fusion", "global", "hard"])
def test_yes_probability_and_branch_match_rec_eval_fusion(stage3_ids, tmp_path, mode):
    w = stage3_ids
    scores = tmp_path / "scores.parquet"
    _cli("eval", "--config", "configs/thinkrec/stage3_smoke.yaml", "--export", str(w["export"]), "--split",
         str(w["prep"] / "test.parquet"), "--limit", str(LIMIT), "--fusion", "--scores", str(scores),
         *w["overrides"])
    ref = pd.read_parquet(scores).sort_values("sample_index")
    recs = sorted(_explain(w, mode), key=lambda r: r["sample_index"])
    assert [r["sample_index"] for r in recs] == ref["sample_index"].tolist() == list(range(LIMIT))
    got = np.array([r["score"] for r in recs])
    # left-padded generation prefill vs the packed scoring forward, fp32: agree to float rounding of logits ~1
    np.testing.assert_allclose(got, ref[f"score_{mode}"].to_numpy(), atol=2e-5)
    np.testing.assert_allclose([r["yes_prob"] for r in recs], 1 / (1 + np.exp(-got)), rtol=1e-12)
    assert [r["gate_branch"] for r in recs] == ref["gate_branch"].tolist()
    assert all(r["mode"] == mode and len(r["gate_weights"]) == 3 and abs(sum(r["gate_weights"]) - 1) < 1e-5
               for r in recs)
    if mode == "fusion":  # the modes really differ on these rows, so the comparisons above can fail
        assert not np.allclose(ref["score_fusion"], ref["score_global"])


def test_greedy_texts_equal_an_independent_loop_and_batching_does_not_change_them(stage3_ids):
    from distthink.models.molora import molora_gates
    from distthink.tasks.thinkrec.evaluate import (
        FusionGates,
        eval_samples,
        eval_wrapper,
        load_stage3_for_eval,
        projector_source,
    )
    from distthink.tasks.thinkrec.task import ThinkRecTask

    w = stage3_ids
    recs = _explain(w, "fusion", max_new_tokens=6)
    alone = [r for i in range(3) for r in _explain(w, "fusion", max_new_tokens=6, batch_size=1)[i:i + 1]]
    assert [r["text"] for r in recs[:3]] == [r["text"] for r in alone]
    # the independent loop: full forward on [prompt embeddings (injected), generated token embeddings] each step
    cfg = _cfg(w)
    task = ThinkRecTask(cfg)
    tok, samples = eval_samples(cfg, task, str(w["prep"] / "test.parquet"), LIMIT)
    model, gate, mdir = load_stage3_for_eval(str(w["export"]))
    wrapper = eval_wrapper(model, tok, task.opt, projector_source(task.opt, str(w["export"]), None))
    gates = FusionGates(mdir, gate, 2, task.opt.cf_export, task.opt.molora.groups_dir)
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id, tok.pad_token_id}
    for s, rec in zip(samples[:3], recs[:3]):
        m = s.meta
        ids = torch.tensor([s.input_ids[:m["answer_row"] + 1]])
        with torch.no_grad(), molora_gates(model, gates(torch.tensor([m["user_id"]]))["fusion"]):
            emb = wrapper.embed(ids, None, torch.tensor([m["user_id"]]), torch.tensor([m["item_id"]]),
                                torch.tensor(m["history_ids"], dtype=torch.long), torch.tensor([len(m["history_ids"])]))
            new = []
            for _ in range(6):
                tail = model.get_input_embeddings()(torch.tensor([new], dtype=torch.long))
                logits = model(inputs_embeds=torch.cat([emb, tail], 1)).logits[0, -1]
                if not new:
                    assert abs(float(logits[wrapper.yes_id]) - rec["score"]) < 2e-5
                nxt = int(logits.argmax())
                if nxt in stops:
                    break
                new.append(nxt)
        assert tok.decode(new, skip_special_tokens=False) == rec["text"]


@pytest.mark.slow
def test_two_ranks_zero3_give_the_records_of_one_process(stage3_ids, tmp_path):
    w = stage3_ids
    args = ["--config", "configs/thinkrec/stage3_smoke.yaml", "--export", str(w["export"]), "--split",
            str(w["prep"] / "test.parquet"), "--limit", "5", "--max-new-tokens", "6", "--batch-size", "2"]
    one = _cli("explain", *args, "--out", str(tmp_path / "one.jsonl"), *w["overrides"])
    cli = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "distthink", "rec", "explain", *args, "--out", str(tmp_path / "two.jsonl"), *w["overrides"],
           "distributed.deepspeed=ds_configs/zero3.json"]
    p = subprocess.run(cli, cwd=ROOT, env=env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "partitioned across 2 ranks (ZeRO-3)" in p.stderr
    a = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["sample_index"] for r in b] == list(range(5))  # 3 + 2 rows: rank 1 ran a dummy batch in step
    assert [r["text"] for r in a] == [r["text"] for r in b]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=2e-5)
    m1 = json.loads([x for x in one.splitlines() if x.startswith("{")][-1])
    m2 = json.loads([x for x in p.stdout.splitlines() if x.startswith("{")][-1])
    assert m1["rows"] == m2["rows"] == 5 and m2["world_size"] == 2


def test_metrics_against_hand_computations():
    from distthink.inference.metrics import corpus_bleu4, meteor_nosyn, rouge_l, tokenize
    from distthink.tasks.thinkrec.explain import explain_metrics

    def rec(label, score_yes, gen, reason, ref):
        return {"label": label, "scored_verdict": "Yes" if score_yes else "No", "generated_verdict": gen,
                "reason": reason, "reference_reason": ref, "gate_branch": "fuse"}

    records = [rec(1, True, "Yes", "because the user liked sci-fi", "Yes. because the user liked sci-fi movies"),
               rec(0, True, "No", "", "No. because dull"),
               rec(0, False, None, "", ""),
               rec(1, False, "No", "because horror", "")]
    m = explain_metrics(records)
    assert (m["rows"], m["verdict_parsed"], m["with_reason"], m["reason_pairs"]) == (4, 3, 2, 1)
    assert m["verdict_agreement"] == pytest.approx(2 / 3)
    assert m["scored_accuracy"] == pytest.approx(2 / 4) and m["generated_accuracy"] == pytest.approx(2 / 3)
    hyp, ref = tokenize("because the user liked sci-fi"), tokenize("because the user liked sci-fi movies")
    assert m["bleu4"] == pytest.approx(corpus_bleu4([hyp], [ref]))
    assert m["rouge_l"] == pytest.approx(rouge_l(hyp, ref)["f"]) and m["meteor_nosyn"] == pytest.approx(
        meteor_nosyn(hyp, ref))
    assert m["branch_counts"] == {"expert": 0, "global": 0, "fuse": 4}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_explain_on_the_accelerator_matches_the_cpu(stage3_ids):
    """`rec explain --device cuda`: the tables, projector, experts and gates follow the model to the GPU; greedy texts
    and scores equal the CPU run's (fp32 on both; TF32 off so the matmuls round as on the CPU)."""
    from distthink.inference.generate import GenerationOptions
    from distthink.tasks.thinkrec.explain import explain_split

    w = stage3_ids
    torch.backends.cuda.matmul.allow_tf32 = False
    runs = {dev: explain_split(_cfg(w), str(w["prep"] / "test.parquet"), export=str(w["export"]), mode="fusion",
                               gen=GenerationOptions(max_new_tokens=6, batch_size=4), limit=LIMIT, device=dev)
            for dev in ("cpu", "cuda")}
    assert [r["gate_branch"] for r in runs["cpu"]] == [r["gate_branch"] for r in runs["cuda"]]
    np.testing.assert_allclose([r["score"] for r in runs["cuda"]], [r["score"] for r in runs["cpu"]], atol=1e-4)
    assert [r["text"] for r in runs["cuda"]] == [r["text"] for r in runs["cpu"]]
