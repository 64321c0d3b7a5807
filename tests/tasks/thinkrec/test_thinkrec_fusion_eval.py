"""`distthink rec eval --fusion` on a tiny stage-3 export: the three gate modes (entropy-gated fusion, global
adapter only, hard routing only) and the entropy gate's branch counts, each checked against an independent
route (plain peft for the global adapter, one-hot gates built from the group table with pandas for hard)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from _thinkrec_inputs import EVAL_K, write_adapter
from _tolerance import fp_tol
from _train_utils import ROOT, env

LIMIT = 12
GATE_SETTINGS = {"tau": 0.5, "expert_margin": 0.1, "entropy_frac": 0.9}


def _gate():
    from distthink.tasks.thinkrec.gate import GateConfig

    return GateConfig(**GATE_SETTINGS)


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "distthink", "rec", *args], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def stage3(tmp_path_factory):
    """A stage-3 export as the trainer writes it (plain base in export/, adapters in export/molora), built
    directly: every adapter = the stage-1 adapter + its own perturbation, so the modes give different scores."""
    from transformers import AutoModelForCausalLM

    from distthink.config import load_config
    from distthink.models.load import build_model_config, load_tokenizer
    from distthink.models.molora import apply_molora, molora_layers
    from distthink.models.molora_export import export_molora
    from distthink.tasks.thinkrec.gate import EntropyGate
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic
    from distthink.tasks.thinkrec.task import ThinkRecTask

    root = tmp_path_factory.mktemp("fusion")
    prep, cf, groups = root / "prep", root / "cf", root / "groups"
    prepare_synthetic(prep, reasons="template", n_users=20, n_items=40, min_per_user=10, max_per_user=20)
    _cli("train-cf", "--data", str(prep), "--out", str(cf), "--epochs", "2", "--no-progress")
    _cli("group", "--cf", str(cf), "--out", str(groups), "--n-groups", "2", "--no-plots")
    write_adapter(root / "stage1")
    overrides = [f"task.options.cf_export={cf}", f"task.options.molora.groups_dir={groups}",
                 f"task.options.molora.init_adapter={root / 'stage1'}", "task.options.molora.gate=soft"]
    cfg = load_config("configs/thinkrec/stage3_smoke.yaml", overrides)
    tok = load_tokenizer(cfg)
    ThinkRecTask(cfg).prepare_tokenizer(tok)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(build_model_config(cfg, tok))
    export = root / "export"
    base.save_pretrained(str(export))
    model = apply_molora(base, 2, init_from_peft_adapter=str(root / "stage1"))
    g = torch.Generator().manual_seed(1)
    for layer in molora_layers(model).values():
        for e in range(3):
            a, b = layer.adapter_weights(e)
            layer.set_adapter_weights(e, a + 0.3 * torch.randn(a.shape, generator=g),
                                      b + 0.3 * torch.randn(b.shape, generator=g))
    # non-default settings, as task.options.molora would write them: `rec eval --fusion` must read them back
    export_molora(model, export / "molora", gate=EntropyGate.from_groups(groups, _gate()), groups_dir=groups)
    return root, prep, cf, groups, export, overrides, cfg


def test_rec_eval_fusion_three_modes_and_branch_counts(stage3, tmp_path):
    from distthink.config import load_config
    from distthink.models.molora import hard_gate
    from distthink.tasks.thinkrec.evaluate import evaluate, score_split_fusion

    root, prep, cf, groups, export, overrides, cfg = stage3
    split = str(prep / "test.parquet")
    scores = tmp_path / "scores.parquet"
    out = _cli("eval", "--config", "configs/thinkrec/stage3_smoke.yaml", "--export", str(export), "--split", split,
               "--limit", str(LIMIT), "--fusion", "--scores", str(scores), *overrides)
    lines = out.strip().splitlines()
    res = json.loads(lines[-1])
    for mode in ("fusion", "global", "hard"):
        assert res[f"llm_{mode}"]["n"] == LIMIT and np.isfinite(res[f"llm_{mode}"]["auc"])
        assert any(ln.startswith(f"llm_{mode}: ") and " auc=" in ln for ln in lines)
    assert any(ln.startswith("branch_counts: expert=") for ln in lines)
    bc = res["branch_counts"]
    assert set(bc) == {"expert", "global", "fuse"} and sum(bc.values()) == LIMIT
    df = pd.read_parquet(scores).sort_values("sample_index")
    assert len(df) == LIMIT and df["gate_branch"].value_counts().to_dict() == {k: v for k, v in bc.items() if v}
    # the adapters differ, so the modes' scores differ (the equalities below can fail)
    assert not np.allclose(df["score_global"], df["score_hard"])

    # global only == the global adapter loaded with plain peft onto the exported base (rec eval without --fusion)
    plain = tmp_path / "global_plain"
    shutil.copytree(export / "molora" / "global", plain)
    (plain / "base_model").symlink_to(export, target_is_directory=True)
    plain_scores = tmp_path / "plain.parquet"
    m = evaluate(load_config("configs/thinkrec/stage3_smoke.yaml", overrides), split, export=str(plain),
                 limit=LIMIT, scores_out=str(plain_scores))
    ref = pd.read_parquet(plain_scores).sort_values("sample_index")
    assert np.array_equal(ref["sample_index"].to_numpy(), df["sample_index"].to_numpy())
    # two fp32 routes (MoLoRA with the global gate, plain peft) to the same logits, in other processes and batches
    tol = fp_tol(torch.float32, np.abs(ref["score"].to_numpy()).max(), k=EVAL_K)
    np.testing.assert_allclose(df["score_global"].to_numpy(), ref["score"].to_numpy(), rtol=0, atol=tol)
    assert m["auc"] == pytest.approx(res["llm_global"]["auc"])  # counts of ordered pairs: equal unless 2 scores swap

    # hard only == one-hot gates computed here from the group table (dict lookup; unknown users -> global)
    table = pd.read_parquet(groups / "user_groups.parquet")
    group_of = dict(zip(table["user_id"].tolist(), table["group"].tolist()))

    def independent(user_ids):
        g = torch.zeros(len(user_ids), 3)
        for i, u in enumerate(user_ids.tolist()):
            g[i, group_of.get(u, 2)] = 1.0
        return {"fusion": g}  # scored in the "fusion" slot so the hard slot stays the module's own

    r, n = score_split_fusion(load_config("configs/thinkrec/stage3_smoke.yaml", overrides), split,
                              export=str(export), limit=LIMIT, gates_fn=independent)
    order = np.argsort(r["idx"])
    # the same route in this process and in the CLI's (OMP_NUM_THREADS=1): the BLAS may split the work otherwise
    hard = df["score_hard"].to_numpy()
    tol = fp_tol(torch.float32, np.abs(hard).max(), k=EVAL_K)
    np.testing.assert_allclose(r["fusion"][order], hard, rtol=0, atol=tol)
    np.testing.assert_allclose(r["hard"][order], hard, rtol=0, atol=tol)
    assert hard_gate(torch.tensor([0, -1]), 2).tolist() == [[1, 0, 0], [0, 0, 1]]


def _thinkrec_rule(users, cf, groups, tau, margin, frac):
    """The gate in plain numpy/pandas from the raw CF vectors and the raw group means (mean of the fitted members'
    vectors), in ThinkRec's order: entropy test first, then the single-expert margin, else fuse."""
    from safetensors.torch import load_file

    vec = load_file(str(cf / "embeddings.safetensors"))["user"].double().numpy()
    table = pd.read_parquet(groups / "user_groups.parquet")
    fitted = table[table["fitted"]]
    k = int(table["group"].max()) + 1
    means = np.stack([vec[fitted["user_id"][fitted["group"] == g].to_numpy()].mean(0) for g in range(k)])
    out = []
    for u in users:
        cos = means @ vec[u] / (np.linalg.norm(means, axis=1) * np.linalg.norm(vec[u]))
        w = np.exp(cos / tau - (cos / tau).max())
        w /= w.sum()
        h = -(w * np.log(w)).sum()
        out.append("global" if h > frac * np.log(k) else "expert" if w.max() > 0.5 + margin / k else "fuse")
    return out


def test_fusion_reads_the_gate_settings_back_from_molora_json(stage3, tmp_path):
    root, prep, cf, groups, export, overrides, cfg = stage3
    meta = json.loads((export / "molora" / "molora.json").read_text())
    assert {k: meta["gate"][k] for k in GATE_SETTINGS} == GATE_SETTINGS and meta["gate"]["space"] == "raw"
    scores = tmp_path / "s.parquet"
    # the config's own molora settings are the defaults: the export's molora.json must win
    _cli("eval", "--config", "configs/thinkrec/stage3_smoke.yaml", "--export", str(export), "--split",
         str(prep / "test.parquet"), "--fusion", "--scores", str(scores), *overrides)
    df = pd.read_parquet(scores).sort_values("sample_index")
    users = df["user_id"].tolist()
    assert df["gate_branch"].tolist() == _thinkrec_rule(users, cf, groups, **dict(zip(
        ("tau", "margin", "frac"), GATE_SETTINGS.values())))
    # with the defaults the branches differ on these rows, so the equality above can fail
    assert df["gate_branch"].tolist() != _thinkrec_rule(users, cf, groups, 0.1, 0.6, 0.95)
