"""MoLoRA under DeepSpeed ZeRO-3 with 2 real ranks (gloo, CPU), without the stage-3 trainer: the adapters are
partitioned, hard-routed training changes only the experts whose groups have samples (an expert with no
samples on any rank stays bit-identical), the result equals a single-process plain-torch reference, and
export_molora gathers the partitioned adapters into folders that load_molora reads back."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from _tolerance import TINY_DECODER_K, fp_tol

K = 3
GROUP_OF_RANK = (0, 2)         # expert 1 and the global adapter (3) get no samples
LR = 1e-2
STEPS = 2


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model():
    from transformers import AutoModelForCausalLM

    from distthink.models.molora import apply_molora, molora_layers
    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(0)
    cfg = tiny_qwen3_config(vocab_size=128, pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    model = apply_molora(model, K, r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B so A gets gradients from step 1
        for layer in molora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def _ids(rank):
    return torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(10 + rank))


def _loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def _worker(rank, world, port, out):
    import deepspeed
    import torch.distributed as dist

    from distthink.models.molora import hard_gate, molora_gates, molora_layers
    from distthink.models.molora_export import export_molora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        model = _model()
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
               "zero_allow_untested_optimizer": True}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        layers = molora_layers(engine.module)
        assert layers and all(hasattr(m.lora_A, "ds_id") and m.lora_A.data.numel() < m.lora_A.ds_numel
                              for m in layers.values()), "MoLoRA adapters are not ZeRO-3 partitioned"
        gates = hard_gate(torch.tensor([GROUP_OF_RANK[rank]]), K)
        for _ in range(STEPS):
            with molora_gates(engine.module, gates):
                engine.backward(_loss(engine, _ids(rank)))
            engine.step()
        export_molora(engine.module, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_zero3_hard_routing_changes_only_used_experts(tmp_path):
    import torch.multiprocessing as mp

    from distthink.models.molora import hard_gate, molora_gates, molora_layers
    from distthink.tasks.thinkrec.gate import load_molora

    out = tmp_path / "molora"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)

    # reference: one process, plain torch; DeepSpeed averages the ranks' gradients = mean of the two losses
    ref = _model()
    init = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in molora_layers(ref).items()}
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        total = 0
        for rank, group in enumerate(GROUP_OF_RANK):
            with molora_gates(ref, hard_gate(torch.tensor([group]), K)):
                total = total + _loss(ref, _ids(rank)) / len(GROUP_OF_RANK)
        total.backward()
        opt.step()
        opt.zero_grad()

    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=128, pad_token_id=0, eos_token_id=1),
                                            dtype=torch.float32, attn_implementation="sdpa")
    trained, _ = load_molora(base, out)
    # AdamW normalises each update to ~LR, so a relative gradient error rho moves a weight by ~LR * rho per step.
    # ZeRO-3 runs its own linear kernels: rho is the tiny decoder's fp32 forward + backward chain, relative to a
    # gradient element's sum|terms|, ~sqrt(10 tokens x 64 outputs) x the element for random signs. A routing bug
    # moves the weights by O(STEPS * LR) = 2e-2, ~600x this bound.
    tol = STEPS * LR * fp_tol(torch.float32, (10 * 64) ** 0.5, k=2 * TINY_DECODER_K)
    for name, layer in molora_layers(trained).items():
        ref_layer = molora_layers(ref)[name]
        for e in range(K + 1):
            a, b = layer.adapter_weights(e)
            ia, ib = init[name][0][e * 4:(e + 1) * 4], init[name][1][:, e * 4:(e + 1) * 4]
            if e in GROUP_OF_RANK:
                assert not torch.equal(a, ia) and not torch.equal(b, ib), (name, e)
            else:  # no samples of this group on any rank: bit-identical
                assert torch.equal(a, ia) and torch.equal(b, ib), (name, e)
            ra, rb = ref_layer.adapter_weights(e)
            assert (a - ra).abs().max() <= tol and (b - rb).abs().max() <= tol, (name, e)
