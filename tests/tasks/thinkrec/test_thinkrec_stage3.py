"""ThinkRec stage 3 (task.options.molora): option validation, gates per sample, and a 2-rank ZeRO-3 run where
every expert learns only from its own group's samples (an expert whose group has no sample keeps the stage-1
weights bit for bit), exported as plain PEFT adapters."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _thinkrec_inputs import EVAL_K, write_adapter, write_groups
from _tolerance import TINY_DECODER_K, fp_tol
from _train_utils import launch, metrics


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic

    root = tmp_path_factory.mktemp("stage3")
    prep = root / "prep"
    prepare_synthetic(prep, reasons="template", n_users=20, n_items=40, min_per_user=10, max_per_user=20)
    users = pd.read_parquet(prep / "train.parquet")["user_id"].iloc[:8].tolist()
    missing = (users[0],)
    assert len(set(users) - set(missing)) >= 2
    write_groups(root / "groups", users, missing=missing)
    adapter = write_adapter(root / "stage1")
    return root, prep, adapter, users, missing


def _opts(root, **extra):
    from distthink.config import load_config

    return load_config("configs/thinkrec/stage3_smoke.yaml", [
        f"task.options.molora.groups_dir={root / 'groups'}", f"task.options.molora.init_adapter={root / 'stage1'}",
        *[f"task.options.molora.{k}={v}" for k, v in extra.items()]])


def test_options_validated_with_key_and_fix(world):
    from distthink.errors import ConfigError
    from distthink.tasks.thinkrec.options import ThinkRecOptions

    root = world[0]
    good = {"groups_dir": str(root / "groups"), "init_adapter": str(root / "stage1")}
    ThinkRecOptions.from_dict({"molora": good})
    for bad, words in (({**good, "gate": "fuzzy"}, "molora.gate"), ({**good, "groups_dir": str(root)}, "groups_dir"),
                       ({**good, "init_adapter": str(root)}, "init_adapter"), ({**good, "experts": 3}, "unknown"),
                       ({**good, "gate": "soft"}, "cf_export"), ({**good, "tau": 0}, "molora.tau=0"),
                       ({**good, "entropy_frac": 1.5}, "molora.entropy_frac"),
                       ({**good, "expert_margin": -1}, "molora.expert_margin"),
                       ({**good, "gate_space": "cosine"}, "molora.gate_space")):
        with pytest.raises(ConfigError, match=words) as e:
            ThinkRecOptions.from_dict({"molora": bad})
        assert "Fix" in str(e.value)
    m = ThinkRecOptions.from_dict({"molora": {**good, "tau": 0.3, "gate_space": "standardised"}}).molora
    assert (m.gate_config().tau, m.gate_config().space, m.dropout) == (0.3, "standardised", 0.05)
    # a `rec group` folder from before the raw gate space has no raw group means: raw needs them, standardised not
    import shutil

    from safetensors.numpy import load_file, save_file

    old = root / "groups_old"
    if not old.exists():
        shutil.copytree(root / "groups", old)
        t = load_file(str(old / "groups.safetensors"))
        save_file({k: v for k, v in t.items() if k != "centroids_raw"}, str(old / "groups.safetensors"))
    with pytest.raises(ConfigError, match="centroids_raw.*Fix: run `distthink rec group` again"):
        ThinkRecOptions.from_dict({"molora": {**good, "groups_dir": str(old)}})
    ThinkRecOptions.from_dict({"molora": {**good, "groups_dir": str(old), "gate_space": "standardised"}})


def test_hard_gates_follow_the_group_table(world):
    from distthink.models.molora import apply_molora  # noqa: F401  (import check)
    from distthink.tasks.thinkrec.options import MoLoRAStage
    from distthink.tasks.thinkrec.task import ThinkRecTask

    root, _, _, users, missing = world
    task = ThinkRecTask.__new__(ThinkRecTask)
    task.opt = type("O", (), {"molora": MoLoRAStage.from_dict({"groups_dir": str(root / "groups"),
                                                                "init_adapter": str(root / "stage1")})})()
    model = torch.nn.Sequential()
    model.q_proj = torch.nn.Linear(64, 64)
    model.v_proj = torch.nn.Linear(64, 32)
    from distthink.tasks.thinkrec.grouping import load_groups

    table = load_groups(root / "groups")["table"]
    task.num_experts = 3
    task.gate = None
    task.user_group = torch.full((10_001,), -1, dtype=torch.long)
    task.user_group[torch.as_tensor(table["user_id"].to_numpy().copy())] = torch.as_tensor(table["group"].to_numpy().copy())
    ids = torch.tensor([users[1], missing[0], 10_000, 99_999])
    g = task.sample_gates(ids)
    expected = torch.zeros(4, 4)
    expected[0, int(table.set_index("user_id").loc[users[1], "group"])] = 1
    expected[1, 3] = expected[2, 2] = expected[3, 3] = 1  # missing / unknown id -> global (column K)
    assert torch.equal(g, expected)


def _soft_task(root, cfg):
    """A stage-3 ThinkRecTask reduced to its soft gate (no model): sample_gates is what forward calls."""
    from distthink.tasks.thinkrec.gate import EntropyGate
    from distthink.tasks.thinkrec.task import ThinkRecTask

    task = ThinkRecTask.__new__(ThinkRecTask)
    task.gate, task.num_experts = EntropyGate.from_groups(root / "groups", cfg), 3
    return task


def test_soft_gates_follow_the_configured_rule_on_raw_vectors(world):
    """gate: soft, CPU: per-sample weights = ThinkRec's rule with the configured settings on the raw CF vectors vs
    the raw group means (computed here in float64 numpy, entropy test first)."""
    from distthink.tasks.thinkrec.gate import GateConfig

    root = world[0]
    g = torch.Generator().manual_seed(3)
    table = torch.randn(50, 8, generator=g)
    ids = torch.tensor([3, 17, 17, 42, 0, 9])
    for cfg in (GateConfig(), GateConfig(tau=0.5, expert_margin=0.1, entropy_frac=0.8)):
        w = _soft_task(root, cfg).sample_gates(ids, table)
        from safetensors.numpy import load_file

        c = load_file(str(root / "groups" / "groups.safetensors"))["centroids_raw"].astype(np.float64)
        for row, u in zip(w, ids.tolist()):
            e = table[u].double().numpy()
            cos = c @ e / (np.linalg.norm(c, axis=1) * np.linalg.norm(e))
            p = np.exp(cos / cfg.tau - (cos / cfg.tau).max())
            p /= p.sum()
            if -(p * np.log(p)).sum() > cfg.entropy_frac * np.log(3):
                want = np.eye(4)[3]
            elif p.max() > 0.5 + cfg.expert_margin / 3:
                want = np.eye(4)[p.argmax()]
            else:
                want = np.append(p, 0.0)
            np.testing.assert_allclose(row.double().numpy(), want, atol=1e-6)
        assert w.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_soft_gates_with_ids_on_the_accelerator(world):
    """The batch is moved to the accelerator before forward; the CF table stays on the CPU: the gate must look the
    ids up on the CPU (indexing a CPU table with CUDA ids raises)."""
    from distthink.tasks.thinkrec.gate import GateConfig

    task = _soft_task(world[0], GateConfig())
    table = torch.randn(50, 8)
    ids = torch.tensor([3, 17, 42])
    assert torch.equal(task.sample_gates(ids.cuda(), table), task.sample_gates(ids, table))


@pytest.mark.slow
def test_stage3_zero3_two_ranks_experts_learn_only_from_their_group(tmp_path, world):
    from peft import PeftModel
    from safetensors.torch import load_file

    root, prep, stage1, users, _ = world
    out = tmp_path / "run"
    launch(["--config", "configs/thinkrec/stage3_smoke.yaml", f"data.train={prep / 'train.parquet'}",
            "data.eval=null", f"train.output_dir={out}", "distributed.deepspeed=ds_configs/zero3.json",
            f"task.options.molora.groups_dir={root / 'groups'}", f"task.options.molora.init_adapter={root / 'stage1'}",
            "task.options.max_train_samples=8", "batch.samples_per_micro=2", "batch.shuffle=false",
            "train.lr=3e-3", "train.max_steps=4"], nproc=2)
    rows = metrics(out)
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # 8 samples = 2 steps per epoch, no shuffle: steps 3/4 see the data of steps 1/2 again, after training on it.
    assert rows[2]["loss"] < rows[0]["loss"] and rows[3]["loss"] < rows[1]["loss"], rows
    mdir = out / "export" / "molora"
    meta = json.loads((mdir / "molora.json").read_text())
    assert meta["adapters"] == ["expert_0", "expert_1", "expert_2", "global"] and meta["gate"] is not None
    w = {n: load_file(str(mdir / n / "adapter_model.safetensors")) for n in meta["adapters"]}
    for name in meta["adapters"]:
        assert sorted(w[name]) == sorted(stage1)
    same = {n: all(torch.equal(w[n][k], stage1[k]) for k in stage1) for n in meta["adapters"]}
    # group 2 has no sample in the run: untouched; groups 0, 1 and the global adapter (a user missing from
    # the table) trained.
    assert same == {"expert_0": False, "expert_1": False, "expert_2": True, "global": False}, same

    # Plain peft loads an exported expert onto the exported base and reproduces the MoLoRA layer (one-hot gate).
    from transformers import AutoModelForCausalLM

    from distthink.models.molora import hard_gate, molora_gates

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(out / "export"), dtype=torch.float32)
    x = torch.randint(0, 100, (1, 12))
    peft = PeftModel.from_pretrained(base, str(mdir / "expert_1")).double()  # the float64 reference
    with torch.no_grad():
        ref = peft(input_ids=x).logits
    from distthink.tasks.thinkrec.gate import load_molora

    mol, gate = load_molora(AutoModelForCausalLM.from_pretrained(str(out / "export"), dtype=torch.float32), mdir)
    mol.eval()  # the experts were exported with dropout 0.05 (ThinkRec), active in train mode
    assert gate is not None and gate.num_experts == 3
    with torch.no_grad(), molora_gates(mol, hard_gate(torch.tensor([1]), 3)):
        got = mol(input_ids=x).logits
    assert (got.double() - ref).abs().max() <= fp_tol(torch.float32, ref.abs().max(), k=TINY_DECODER_K)  # 12 tokens


@pytest.mark.slow
def test_stage3_soft_gate_with_gradient_checkpointing(tmp_path, world):
    """Soft (entropy) gate on real CF vectors + `rec group`, one rank, activations recomputed in backward: the
    gates set by the task's forward must still be there when backward recomputes the forward. Id prompts with
    the stage-2 projector loaded by path (frozen)."""
    import subprocess
    import sys

    from _train_utils import ROOT, env

    root, prep, _, _, _ = world
    cf, groups = tmp_path / "cf", tmp_path / "groups"
    for cmd in (["train-cf", "--data", str(prep), "--out", str(cf), "--epochs", "2", "--no-progress"],
                ["group", "--cf", str(cf), "--out", str(groups), "--n-groups", "2", "--no-plots"]):
        p = subprocess.run([sys.executable, "-m", "distthink", "rec", *cmd], cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    # With id prompts: the stage-2 projector is reloaded by path (task.options.init_projector) and kept frozen.
    from safetensors.torch import load_file

    from distthink.models.inject import Projector
    from distthink.tasks.thinkrec.options import ThinkRecOptions
    from distthink.tasks.thinkrec.projector_export import save_projector_export

    torch.manual_seed(5)
    stage2 = tmp_path / "stage2_export"
    save_projector_export(Projector(64, 64, mult=5, activation="relu"), stage2,
                          ThinkRecOptions.from_dict({"prompt_mode": "ids", "cf_export": str(cf)}))
    out = tmp_path / "run"
    launch(["--config", "configs/thinkrec/stage3_smoke.yaml", f"data.train={prep / 'train.parquet'}",
            "data.eval=null", f"train.output_dir={out}", "model.gradient_checkpointing=true",
            f"task.options.cf_export={cf}", f"task.options.molora.groups_dir={groups}",
            f"task.options.molora.init_adapter={root / 'stage1'}", "task.options.molora.gate=soft",
            "task.options.prompt_mode=ids", f"task.options.init_projector={stage2}",
            "task.options.molora.tau=0.3", "task.options.molora.entropy_frac=0.9",
            "task.options.train_projector=false", "task.options.max_train_samples=8", "train.max_steps=2"], nproc=1)
    rows = metrics(out)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    meta = json.loads((out / "export" / "molora" / "molora.json").read_text())
    # the gate settings of the config are the ones exported (and read back by rec eval --fusion / rec explain)
    assert meta["num_experts"] == 2 and meta["gate"]["tau"] == pytest.approx(0.3)
    assert meta["gate"]["entropy_frac"] == pytest.approx(0.9) and meta["gate"]["space"] == "raw"
    assert meta["gate"]["expert_margin"] == pytest.approx(0.6)
    # the stage-3 export carries the projector it used: stage 2's, unchanged (frozen)
    a, b = load_file(str(stage2 / "projector.safetensors")), load_file(str(out / "export" / "projector.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "export" / "projector.json").read_text())["trained"] is False

    # rec eval --fusion of the id-prompt stage-3 export (projector from the export): the global-only scores equal
    # the global adapter loaded with plain peft onto the exported base, projector from init_projector (frozen).
    import shutil

    from distthink.config import load_config
    from distthink.tasks.thinkrec.evaluate import evaluate, score_split_fusion

    cfg_args = [f"task.options.cf_export={cf}", f"task.options.molora.groups_dir={groups}",
                f"task.options.molora.init_adapter={root / 'stage1'}", "task.options.molora.gate=soft",
                "task.options.prompt_mode=ids", f"task.options.init_projector={stage2}",
                "task.options.train_projector=false"]
    split = str(prep / "test.parquet")
    r, n = score_split_fusion(load_config("configs/thinkrec/stage3_smoke.yaml", cfg_args), split,
                              export=str(out / "export"), limit=6)
    plain = tmp_path / "global_plain"
    shutil.copytree(out / "export" / "molora" / "global", plain)
    (plain / "base_model").symlink_to(out / "export", target_is_directory=True)
    evaluate(load_config("configs/thinkrec/stage3_smoke.yaml", cfg_args), split, export=str(plain), limit=6,
             scores_out=str(tmp_path / "plain.parquet"))
    ref = pd.read_parquet(tmp_path / "plain.parquet").sort_values("sample_index")
    order = np.argsort(r["idx"])
    assert n == 6 and r["idx"][order].tolist() == ref["sample_index"].tolist()
    # two fp32 routes (MoLoRA with the global gate, plain peft) to the same logits
    want = ref["score"].to_numpy()
    np.testing.assert_allclose(r["global"][order], want, rtol=0,
                               atol=fp_tol(torch.float32, np.abs(want).max(), k=EVAL_K))
