"""The GPU-only device paths, run on a CPU machine against a stand-in accelerator (tests/_device_harness.py): every
op that meets a tensor left on the host next to accelerator tensors raises what CUDA raises. Each path also gives
the same numbers as on the host, and a leaky variant (the code before the fix) is shown to be caught.

Defects of issue #19 covered here: 1 (stage-3 soft gate indexed a host CF table with device ids), 2 (ThinkRec
id prompts under ZeRO-3: the CF tables stay on the host), 4 (the graph prefix left on the host in `generate`),
5 (SASRec's padding column built on the host), and rec eval / generation now running on the accelerator."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _device_harness import ACCEL, DeviceMismatch, accelerator, on_accelerator, to_accelerator
from _worlds import thinkrec_overrides, thinkrec_world

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# The harness itself: CUDA's device rules, on CPU data.
# ----------------------------------------------------------------------------------------------------------------

def test_harness_follows_cuda_device_rules():
    with accelerator():
        x = torch.arange(6.0).to(ACCEL)
        assert on_accelerator(x) and x.device == ACCEL
        assert on_accelerator(x * 2 + torch.tensor(1.0))  # a 0-dim host tensor is a scalar operand, as on CUDA
        assert on_accelerator(torch.zeros(3, device=x.device)) and on_accelerator(torch.tensor([1, 2], device=ACCEL))
        with pytest.raises(DeviceMismatch, match="left behind on the host"):
            torch.cat([x, torch.ones(2)])
        with pytest.raises(DeviceMismatch, match="left behind on the host"):
            x + torch.ones(6)
        table = torch.randn(5, 3)
        with pytest.raises(DeviceMismatch, match="indices should be either on cpu"):
            table[torch.tensor([0, 4]).to(ACCEL)]  # a host table indexed with device ids: CUDA refuses it
        assert on_accelerator(table.to(ACCEL)[torch.tensor([0, 4])])  # a device table with host ids: allowed
        host = x.cpu()
        assert not on_accelerator(host) and host.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and float(x.sum()) == 15.0
        with pytest.raises(TypeError):
            x.numpy()
        m = torch.nn.Linear(6, 2).to(ACCEL)
        m(x[None]).sum().backward()
        assert on_accelerator(m.weight) and on_accelerator(m.weight.grad)
        # the ZeRO-3 placement: parameters moved, buffers where they were
        m.register_buffer("table", torch.zeros(2))
        m2 = to_accelerator(torch.nn.Linear(2, 2), buffers=False)
        m2.register_buffer("table", torch.zeros(2))
        assert on_accelerator(m2.weight) and not on_accelerator(m2.table)


# ----------------------------------------------------------------------------------------------------------------
# ThinkRec: stage 2 with id prompts (ZeRO-3 placement), stage 3 soft and hard gates.
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return thinkrec_world(tmp_path_factory.mktemp("gpu_world"))


def _task_model_batch(config: str, overrides: list[str], n: int = 3):
    from distthink.config import load_config
    from distthink.engine import batching
    from distthink.engine.task import make_task
    from distthink.models.load import load_model, load_tokenizer

    cfg = load_config(config, overrides)
    task = make_task(cfg)
    tok = load_tokenizer(cfg)
    task.prepare_tokenizer(tok)
    samples = batching.load_split(cfg, task, "train", tok)
    batch = task.collator(tok)([samples[i] for i in range(n)])
    wrapped = task.wrap_model(load_model(cfg, tok, "cpu", torch.float32), tok)
    return task, wrapped, batch


def _sums(task, wrapped, batch) -> dict:
    torch.manual_seed(0)  # the same dropout masks in both passes (drawn from the host generator either way)
    out = task.forward(wrapped, batch, "sdpa", torch.float32)
    sum(out.values()).backward()
    grads = {n: p.grad.cpu().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    return {k: float(v.detach()) for k, v in out.items()}, grads


def _same_on_accelerator(task, wrapped, batch, *, buffers: bool):
    """The task's forward + backward on the host, then with the model and batch on the accelerator: equal sums and
    gradients (the same CPU arithmetic underneath, so equal up to summation order)."""
    ref, ref_grads = _sums(task, wrapped, batch)
    wrapped.zero_grad(set_to_none=True)
    with accelerator():
        moved = to_accelerator(wrapped, buffers=buffers)
        got, grads = _sums(task, moved, to_accelerator(batch))
        assert all(on_accelerator(p) for p in moved.parameters())
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k
    assert grads.keys() == ref_grads.keys() and grads
    for n, ref_g in ref_grads.items():
        # The same fp32 arithmetic in another summation order (the wrapper's strides pick other kernel paths):
        # differences of a few eps per term over sums of up to a few hundred tokens, relative to the largest entry.
        torch.testing.assert_close(grads[n], ref_g, rtol=0, atol=256 * torch.finfo(torch.float32).eps * float(
            ref_g.abs().max()) + 1e-30)
    return moved


def test_thinkrec_ids_with_zero3_placement_leaves_the_cf_tables_on_the_host(world):
    """Defect 2: under ZeRO-3 DeepSpeed places the parameters (zero.Init) but never the CF tables, buffers of a module
    built outside zero.Init. The lookup must run where the table is and move only the rows."""
    task, wrapped, batch = _task_model_batch(*thinkrec_overrides(world, "ids"))
    moved = _same_on_accelerator(task, wrapped, batch, buffers=False)
    assert not on_accelerator(moved.user_table) and not on_accelerator(moved.item_table)  # ZeRO-3's placement


def test_thinkrec_ids_leaky_lookup_is_caught(world):
    """The lookup before the fix (`projector(table[ids])`) on the same placement: a host table indexed with device
    ids, CUDA's `indices should be either on cpu or on the same device`."""
    from distthink.tasks.thinkrec.model import ThinkRecModel

    task, wrapped, batch = _task_model_batch(*thinkrec_overrides(world, "ids"))
    leaky = lambda self, given, table, ids: self.projector(table[ids])  # noqa: E731
    with accelerator(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ThinkRecModel, "_projected", leaky)
        with pytest.raises(DeviceMismatch, match="indices should be either on cpu"):
            task.forward(to_accelerator(wrapped, buffers=False), to_accelerator(batch), "sdpa", torch.float32)


@pytest.mark.parametrize("gate", ["soft", "hard"])
def test_thinkrec_stage3_gates_on_the_accelerator(world, gate):
    """Defect 1: the soft (entropy) gate reads the host CF user table; the batch's user ids are on the device."""
    task, wrapped, batch = _task_model_batch(*thinkrec_overrides(world, gate))
    _same_on_accelerator(task, wrapped, batch, buffers=True)


def test_thinkrec_soft_gate_leaky_lookup_is_caught(world):
    """The soft gate before the fix indexed the host table with the batch's (device) ids."""
    from distthink.tasks.thinkrec.task import ThinkRecTask

    task, wrapped, batch = _task_model_batch(*thinkrec_overrides(world, "soft"))

    def leaky(self, user_ids, user_table=None, user_vecs=None):
        return self.gate(user_table[user_ids].detach().float().cpu()).weights

    with accelerator(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ThinkRecTask, "sample_gates", leaky)
        with pytest.raises(DeviceMismatch, match="indices should be either on cpu"):
            task.forward(to_accelerator(wrapped), to_accelerator(batch), "sdpa", torch.float32)


def test_sft_and_molecule_training_forward_on_the_accelerator():
    for config, overrides in (("configs/default.yaml", ["data.max_train_samples=4"]),
                              ("configs/molecule/cpu_smoke.yaml", ["data.max_train_samples=4", "lora.enabled=true"])):
        task, wrapped, batch = _task_model_batch(config, overrides, n=2)
        _same_on_accelerator(task, wrapped, batch, buffers=True)


# ----------------------------------------------------------------------------------------------------------------
# rec train-cf (SASRec) and rec eval.
# ----------------------------------------------------------------------------------------------------------------

def _cf_splits(prep: Path):
    from distthink.tasks.thinkrec.cf import load_split
    from distthink.tasks.thinkrec.prepare import find_split

    n_u, n_i = len(pd.read_parquet(prep / "users.parquet")), len(pd.read_parquet(prep / "items.parquet"))
    return {k: load_split(find_split(prep, k), n_i, 10) for k in ("train", "valid")}, n_u, n_i


@pytest.mark.parametrize("model", ["sasrec", "mf"])
def test_train_cf_on_the_accelerator_equals_the_host_run(world, model):
    """Defect 5: `rec train-cf --model sasrec` picks CUDA when present; its [CLS] padding column was built on the
    host. Training on the accelerator gives the host run's weights (same seed, same CPU arithmetic)."""
    from distthink.tasks.thinkrec.cf import CFConfig, train_cf

    splits, n_u, n_i = _cf_splits(world["prep"])
    cfg = dict(model=model, dim=8, max_epochs=2, progress=False)
    ref = train_cf(splits["train"], splits["valid"], n_u, n_i, CFConfig(device="cpu", **cfg))
    with accelerator():
        got = train_cf(splits["train"], splits["valid"], n_u, n_i, CFConfig(device=str(ACCEL), **cfg))
    assert got.valid_auc == pytest.approx(ref.valid_auc, abs=1e-12)
    for (k, a), (_, b) in zip(sorted(got.model.state_dict().items()), sorted(ref.model.state_dict().items())):
        assert not on_accelerator(a), k  # results and exports live on the host
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sasrec_leaky_padding_column_is_caught(world):
    from distthink.tasks.thinkrec.cf import SASRec

    splits, n_u, n_i = _cf_splits(world["prep"])
    batch = splits["train"].take(torch.arange(4))
    with accelerator():
        m = SASRec(n_u, n_i, 8, 10, 1, 2, 0.0).to(ACCEL)
        b = batch.to(ACCEL)
        assert on_accelerator(m.encode(b.hist_items, b.hist_labels, b.hist_mask))
        n = b.hist_items.shape[0]
        with pytest.raises(DeviceMismatch):  # the column of the code before the fix
            torch.cat([torch.zeros(n, 1, dtype=torch.bool), ~b.hist_mask], dim=1)


def test_rec_eval_scores_on_the_accelerator(world, monkeypatch):
    """rec eval now runs where the config resolves (the GPU in bf16 by default); here on the stand-in accelerator in
    fp32: the model, the scoring wrapper and every batch move there, and the scores equal the host's."""
    from distthink.config import load_config
    from distthink.tasks.thinkrec import evaluate

    config, overrides = thinkrec_overrides(world, "text")
    cfg = load_config(config, overrides)
    split = str(world["prep"] / "test.parquet")
    ref, n = evaluate.score_split(cfg, split, limit=6, batch_size=4)
    monkeypatch.setattr(evaluate, "eval_placement", lambda cfg: (ACCEL, torch.float32))
    with accelerator():
        got, n2 = evaluate.score_split(cfg, split, limit=6, batch_size=4)
    assert n == n2 and np.array_equal(got["idx"], ref["idx"])
    np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-5, atol=1e-6)


def test_rec_eval_places_and_casts_as_the_config_resolves(world, monkeypatch):
    """train.device / model.dtype of the stage config decide where `rec eval` scores: auto = the GPU in bf16 when one
    is visible (the CPU in fp32 here); model.dtype=bfloat16 scores in bf16 on the CPU too."""
    from distthink.config import load_config
    from distthink.tasks.thinkrec import evaluate

    config, overrides = thinkrec_overrides(world, "text")
    assert evaluate.eval_placement(load_config(config, overrides)) == (torch.device("cpu"), torch.float32)
    cfg = load_config(config, overrides + ["model.dtype=bfloat16"])
    assert evaluate.eval_placement(cfg) == (torch.device("cpu"), torch.bfloat16)
    seen = []
    real = evaluate.load_for_eval
    monkeypatch.setattr(evaluate, "load_for_eval", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    got, _ = evaluate.score_split(cfg, str(world["prep"] / "test.parquet"), limit=4, batch_size=4)
    assert {p.dtype for p in seen[0].parameters()} == {torch.bfloat16} and np.isfinite(got["score"]).all()


# ----------------------------------------------------------------------------------------------------------------
# generate from a molecule checkpoint (graph prefix) on the accelerator.
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def molecule_checkpoint(tmp_path_factory):
    from distthink.config import load_config
    from distthink.train import run

    out = tmp_path_factory.mktemp("mol")
    cfg = load_config("configs/molecule/cpu_smoke.yaml", [
        f"train.output_dir={out}", "train.max_steps=1", "data.eval=null", "data.max_train_samples=8",
        "logging.progress=false", "logging.tensorboard=false", "logging.plot=false", "checkpoint.export=none"])
    assert run(cfg) == 0
    return sorted((out / "checkpoints").glob("step-*"))[-1]


def _prompts(gen):
    from distthink.commands.generate import build_prompts
    from distthink.tasks.molecule.demo import load_demo

    return build_prompts(load_demo("test")[:2], gen.meta, thinking=False)


def test_generate_from_a_molecule_checkpoint_on_the_accelerator(molecule_checkpoint):
    """Defect 4: generation from a checkpoint moved only the language model; the graph encoder + projector stayed
    on the host and met a device graph batch. Now the prefix follows the prompts: same tokens as on the host."""
    from distthink.inference.generate import GenerationOptions, load_generator

    opts = GenerationOptions(max_new_tokens=4)
    gen = load_generator(molecule_checkpoint)
    msgs, graphs = _prompts(gen)
    ref = [r["raw"] for r in gen.generate(msgs, graphs, opts)]
    with accelerator():
        gen = load_generator(molecule_checkpoint, device=ACCEL)
        assert on_accelerator(next(gen.model.parameters()))
        got = [r["raw"] for r in gen.generate(msgs, graphs, opts)]
    assert got == ref


def test_generate_leaky_graph_prefix_is_caught(molecule_checkpoint):
    """The generator before the fix: only the LM on the device, the graph prefix where the checkpoint put it."""
    from distthink.inference.generate import GenerationOptions, load_generator
    from distthink.tasks.molecule.encoder import collate_sample_graphs
    from distthink.tasks.molecule.model import GraphPromptInputs, molecule_inputs_embeds

    class LeftBehind(GraphPromptInputs):
        def inputs_embeds(self, model, input_ids, extras):
            graph_batch, counts = collate_sample_graphs([g or [] for g in extras])
            return molecule_inputs_embeds(model, self.prefix, input_ids, self.graph_token_id, graph_batch, counts)

    with accelerator():
        gen = load_generator(molecule_checkpoint, device=ACCEL)
        gen.prompt_inputs = LeftBehind(gen.prompt_inputs.prefix, gen.prompt_inputs.graph_token_id)
        msgs, graphs = _prompts(gen)
        with pytest.raises(DeviceMismatch):
            list(gen.generate(msgs, graphs, GenerationOptions(max_new_tokens=2)))
