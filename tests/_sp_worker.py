"""Worker of tests/engine/test_sequence_parallel_dist.py: one packed row, loss and grads at SP=1 and with Ulysses SP.

Launched as `torchrun --nproc_per_node N tests/_sp_worker.py OUT.json` (gloo, CPU). Every rank builds the same tiny
Qwen3 and the same packed row (three samples, cut points inside samples), computes the SP=1 reference on the whole
row (before any Ulysses registration), then registers DeepSpeed's UlyssesSPAttentionHF around distthink's packed
core exactly as accelerate does at prepare(), and computes the loss of its shard; the shard losses and gradients
are summed over the group. Variants: plain (static weights), dynamic argmax and soft (with a `</think>` predicted
on shard 0 inside a sample whose answer continues on shard 1), and the leaky ones: no think-state exchange, and
the stock Ulysses core (no mask: plain causal attention over the packed row). Rank 0 writes the results.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from transformers import AutoModelForCausalLM

from distthink.data.packing import collate_packed
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.engine import sequence_parallel as sp
from distthink.engine.lm_loss import LMHeadLoss
from distthink.models import ulysses
from distthink.models.attention import model_inputs
from distthink.models.tiny import tiny_qwen3_config

VOCAB = 96
LENGTHS, PROMPTS = [37, 50, 41], [5, 9, 7]  # 128 tokens: the cut (64 for N=2) falls inside sample 1 (37..86)


def packed_row(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n, prompt in zip(LENGTHS, PROMPTS):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        weights = (0.5 + torch.rand(n, generator=g)).tolist()
        samples.append(EncodedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:],
                                     [0.0] * prompt + weights[prompt:]))
    return collate_packed(samples)


def build_model():
    torch.manual_seed(0)
    cfg = tiny_qwen3_config(vocab_size=VOCAB)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, None  # ids of this test's small vocabulary
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


def loss_and_grads(wrapped, batch, attn, dynamic):
    wrapped.dynamic = dynamic
    wrapped.think_end_id = THINK_END if dynamic else None
    params = [p for p in wrapped.parameters() if p.requires_grad]
    loss, _ = wrapped.head_loss(batch["targets"], batch["target_weights"], model_inputs(batch, attn),
                                segment_ids=batch["segment_ids"], position_ids=batch["position_ids"])
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def choose_think_end(wrapped, batch, cut: int) -> tuple[int, int]:
    """A token the model predicts first at a learned position of sample 1 before the cut (shard 0), with learned
    positions of the sample after it on both sides of the cut: the </think> of this test."""
    with torch.no_grad():
        hidden = wrapped.hidden_states(**model_inputs(batch, "sdpa"))[0]
        pred = (hidden @ wrapped.base.lm_head.weight.t()).argmax(-1)
    start = LENGTHS[0]
    learned = [t for t in range(start, start + LENGTHS[1]) if batch["targets"][0, t] != IGNORE_INDEX]
    for t in sorted((t for t in learned if t < cut), key=lambda t: abs(t - (start + cut) // 2)):
        token = int(pred[t])
        earlier = [u for u in learned if u < t and int(pred[u]) == token]
        if not earlier and t >= learned[0] + 3:
            return token, t
    raise AssertionError("no usable </think> candidate on shard 0")


def main(out_path: str) -> None:
    global THINK_END
    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    batch = packed_row()
    model = build_model()
    wrapped = LMHeadLoss(model, impl="fused", chunk_size=16)
    padded = -(-batch["input_ids"].shape[1] // world) * world
    THINK_END, think_pos = choose_think_end(wrapped, batch, padded // world)
    variants = {"plain": None, "argmax": "argmax", "soft": "soft"}
    reference = {name: loss_and_grads(wrapped, batch, "sdpa", mode) for name, mode in variants.items()}

    # What accelerate does at prepare() with ParallelismConfig(sp_backend="deepspeed"), after distthink's
    # sequence_parallel.before_prepare installed the packed core under the model's attention key.
    ulysses.install_packed_core("sdpa")
    UlyssesSPAttentionHF.register_with_transformers(model_name_or_path=model, core_attn_implementation="sdpa",
                                                    sequence_parallel_size=world, micro_batch_size=1,
                                                    seq_length_is_variable=True, disable_in_eval=False)
    lay = sp.layout(world, rank, world)
    shard = sp.shard(batch, lay)
    state = sp.think_state()
    attn = f"ulysses_sp({'sdpa'})"

    def group_sum(loss, grads):
        t = torch.cat([loss.reshape(1).double(), grads.double()])
        dist.all_reduce(t)
        return t[0].item(), t[1:]

    results = {"world": world, "think_end": THINK_END, "think_pos": think_pos, "cut": padded // world,
               "tokens": int(batch["input_ids"].shape[1]), "variants": {}}
    runs = [(name, mode, state) for name, mode in variants.items()]
    runs += [("argmax_no_exchange", "argmax", None), ("soft_no_exchange", "soft", None)]
    for name, mode, exchange in runs:
        wrapped.sequence_parallel = exchange
        loss, grads = group_sum(*loss_and_grads(wrapped, shard, attn, mode))
        ref_loss, ref_grads = reference[name.split("_")[0]]
        results["variants"][name] = {
            "loss": loss, "ref_loss": ref_loss.item(),
            "grad_max_abs_diff": (grads - ref_grads.double()).abs().max().item(),
            "grad_max_abs": ref_grads.abs().max().item(), "grad_norm": grads.norm().item(),
            "ref_grad_norm": ref_grads.norm().item()}
    # The stock Ulysses core: sdpa with no mask, i.e. causal attention across the samples of the packed row.
    ulysses._sdpa_masks.get = lambda position_ids: None
    wrapped.sequence_parallel = state
    loss, grads = group_sum(*loss_and_grads(wrapped, shard, attn, None))
    ref_loss, ref_grads = reference["plain"]
    results["variants"]["stock_core"] = {
        "loss": loss, "ref_loss": ref_loss.item(),
        "grad_max_abs_diff": (grads - ref_grads.double()).abs().max().item(),
        "grad_max_abs": ref_grads.abs().max().item()}
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1])
