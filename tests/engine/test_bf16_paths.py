"""Every task's forward + backward in bf16 on CPU, the two ways a GPU run computes in 16 bits:

- `bf16` weights, no autocast: what DeepSpeed loads and what a LoRA run trains on (fp32 adapters on a bf16 base);
- `autocast`: fp32 weights under torch.autocast(bf16), distthink's 16-bit full fine-tuning without DeepSpeed.

Asserted where it matters: the LM-head loss's GEMMs run in bf16 (defect 9: under autocast they ran in fp32), the
loss sums are fp32, every gradient has its parameter's dtype (fp32 master weights, fp32 LoRA/MoLoRA adapters next
to a bf16 base), side modules (ThinkRec projector, molecule graph encoder) share the LM's trainable dtype (defect 7)
and the CF tables stay fp32 buffers. DeepSpeed's own bf16 casts are exercised with 2 ranks in
tests/train/test_bf16_zero.py; its ZeRO-2 cast (parameters to bf16, buffers untouched) is reproduced here in-process
for ThinkRec's id prompts (defect 2)."""

import pytest
import torch
from _worlds import thinkrec_overrides, thinkrec_world

import distthink.engine.lm_loss as lm_loss
from distthink.engine import batching

torch.set_num_threads(1)
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return thinkrec_world(tmp_path_factory.mktemp("bf16_world"))


def _variants(world) -> dict:
    """name -> (config, overrides); each run in both modes."""
    t = {v: thinkrec_overrides(world, v) for v in ("text", "ids", "hard", "soft")}
    return {
        "sft_lora": ("configs/default.yaml", ["data.max_train_samples=4", "lora.enabled=true"]),
        "sft_full": ("configs/default.yaml", ["data.max_train_samples=4", "lora.enabled=false"]),
        "thinkrec_text": t["text"],
        "thinkrec_ids": t["ids"],
        "molecule_graph_lora": ("configs/molecule/cpu_smoke.yaml", ["data.max_train_samples=4", "lora.enabled=true"]),
        "molecule_graph_full": ("configs/molecule/cpu_smoke.yaml", ["data.max_train_samples=4"]),
        "molora_hard": t["hard"],
        "molora_soft": t["soft"],
    }


VARIANTS = ["sft_lora", "sft_full", "thinkrec_text", "thinkrec_ids", "molecule_graph_lora", "molecule_graph_full",
            "molora_hard", "molora_soft"]


def _build(config, overrides, param_dtype):
    from distthink.config import load_config
    from distthink.engine.task import make_task
    from distthink.models.load import load_model, load_tokenizer

    cfg = load_config(config, overrides + ["model.dtype=bfloat16", "train.device=cpu"])
    task = make_task(cfg)
    tok = load_tokenizer(cfg)
    task.prepare_tokenizer(tok)
    data = batching.load_split(cfg, task, "train", tok)
    batch = task.collator(tok)([data[i] for i in range(3)])
    model = load_model(cfg, tok, "cpu", param_dtype, compute_dtype=BF16)
    return cfg, task, task.wrap_model(model, tok), batch


class HeadSpy:
    """Records the dtypes the fused LM-head loss receives (and calls it)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = lm_loss.fused_linear_cross_entropy

        def spy(hidden, weight, *args, **kwargs):
            self.calls.append((hidden.dtype, weight.dtype))
            return real(hidden, weight, *args, **kwargs)

        monkeypatch.setattr(lm_loss, "fused_linear_cross_entropy", spy)


def _run(task, wrapped, batch, autocast: bool):
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = task.forward(wrapped, batch, "sdpa", BF16 if not autocast else torch.float32)
    sum(out.values()).backward()
    return out


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
@pytest.mark.parametrize("name", VARIANTS)
def test_task_forward_backward_in_bf16(world, monkeypatch, name, mode):
    from distthink.models.load import side_module_dtype

    config, overrides = _variants(world)[name]
    autocast = mode == "autocast"
    cfg, task, wrapped, batch = _build(config, overrides, torch.float32 if autocast else BF16)
    spy = HeadSpy(monkeypatch)
    out = _run(task, wrapped, batch, autocast)

    # the loss: GEMMs in bf16 on bf16 hidden states, sums in fp32
    assert spy.calls == [(BF16, BF16)], spy.calls
    for k, v in out.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v), (k, v)

    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n
    side = [m for m in (getattr(wrapped, "projector", None), getattr(wrapped, "prefix", None)) if m is not None]
    lm_trainable = {p.dtype for n, p in trainable.items() if not n.startswith(("projector.", "prefix."))}
    if autocast:  # fp32 master weights everywhere: the optimizer's copy
        assert {p.dtype for p in wrapped.parameters()} == {torch.float32}
    else:
        base = {p.dtype for n, p in wrapped.named_parameters() if not p.requires_grad and "lora_" not in n}
        assert base <= {BF16}, base  # the frozen base stays bf16
        adapters = {p.dtype for n, p in wrapped.named_parameters() if "lora_" in n}
        assert adapters <= {torch.float32}, adapters  # LoRA / MoLoRA adapters are fp32 (peft's choice)
    for m in side:  # one trainable dtype with the LM (ZeRO-3), fp32 when the LM is frozen
        assert {p.dtype for p in m.parameters()} == {side_module_dtype(wrapped.model)}
        assert lm_trainable <= {side_module_dtype(wrapped.model)}
    if getattr(wrapped, "user_table", None) is not None:
        assert wrapped.user_table.dtype == torch.float32 and wrapped.item_table.dtype == torch.float32


def test_molecule_graph_prefix_is_fp32_next_to_fp32_lora_on_a_bf16_base(world):
    """Defect 7: the graph encoder + projector were cast to the base's bf16 next to fp32 LoRA adapters: DeepSpeed's
    ZeRO-3 flat partitions need one dtype (its defragment asserts it at `prepare`), and without DeepSpeed AdamW on
    bf16 weights rounds small updates away."""
    _, _, wrapped, _ = _build("configs/molecule/cpu_smoke.yaml", ["data.max_train_samples=4", "lora.enabled=true"],
                              BF16)
    dtypes = {p.dtype for p in wrapped.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}, dtypes


def test_thinkrec_ids_after_deepspeeds_zero2_bf16_cast(world, monkeypatch):
    """Defect 2 (dtype half): DeepSpeed ZeRO-2 in bf16 casts every parameter to bf16 and no buffer
    (engine._cast_module_mixed_precision: "Cast params only; preserve fp32 buffers"). The fp32 CF rows must reach the
    bf16 projector in its dtype; before the fix: `mat1 and mat2 must have the same dtype`."""
    cfg, task, wrapped, batch = _build(*thinkrec_overrides(world, "ids"), BF16)
    for p in wrapped.parameters():  # what DeepSpeed does to a module it did not build under zero.Init
        p.data = p.data.to(BF16)
    assert wrapped.user_table.dtype == torch.float32 and next(wrapped.projector.parameters()).dtype == BF16
    wrapped.projector.requires_grad_(True)
    out = _run(task, wrapped, batch, autocast=False)
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is not None for p in wrapped.projector.parameters())


def test_free_mode_generation_runs_under_the_training_autocast(monkeypatch):
    """Defect 3 (molecule free mode): the on-policy thoughts were generated outside autocast on the fp32 weights of a
    16-bit run, whose attention was chosen for 16-bit compute (flash-attn refuses fp32 on a GPU). The generation
    must compute in the training's autocast dtype: the attention projections see bf16 here."""
    from distthink.config import uses_autocast

    cfg, task, wrapped, batch = _build("configs/molecule/cpu_smoke.yaml", [
        "data.max_train_samples=4", "task.options.think_mode=free", "task.options.max_think_tokens=3"], torch.float32)
    assert uses_autocast(cfg)
    seen = []
    proj = next(m for n, m in wrapped.named_modules() if n.endswith("self_attn.q_proj"))
    proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    train_set = batching.load_split(cfg, task, "train", task._gen_tokenizer)
    task.on_step_start(0, wrapped, train_set, [0, 1])
    assert seen and set(seen) == {BF16}, set(seen)
    assert train_set[0].meta["free_step"] == 0  # the thoughts were regenerated
