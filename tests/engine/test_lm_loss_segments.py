"""LMHeadLoss.track_segments (what a mixture's per-source loss is built from): per sample of a packed micro-batch,
the sum of w * CE and of w, against an independent reference (each sample alone, unpacked, float64 log-softmax),
for the fused and the hf head; the tracked loss equals the untracked one."""

import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol

from distthink.data.packing import collate_packed
from distthink.data.types import EncodedSample
from distthink.engine.lm_loss import LMHeadLoss, loss_parts
from distthink.models.attention import model_inputs
from distthink.models.tiny import tiny_qwen3_config

LENGTHS, PROMPT = (9, 14, 6), (3, 5, 2)


def _samples(vocab: int) -> list[EncodedSample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, p in zip(LENGTHS, PROMPT):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [-100] * p + ids[p:]
        weights = [0.0] * p + (torch.rand(n - p, generator=g) + 0.25).tolist()
        out.append(EncodedSample(ids, labels, weights, {}))
    return out


def _reference(model, samples) -> tuple[list[float], list[float]]:
    """(sum of w * CE, sum of w) per sample: one unpacked forward each, CE from a float64 log-softmax."""
    losses, weights = [], []
    for s in samples:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([s.input_ids])).logits[0].double(), -1)
        t, w = torch.tensor(s.labels[1:]), torch.tensor(s.loss_weights[1:], dtype=torch.float64)
        keep = t != -100
        ce = -logp[:-1][keep].gather(1, t[keep, None]).squeeze(1)
        losses.append(float((ce * w[keep]).sum()))
        weights.append(float(w[keep].sum()))
    return losses, weights


@pytest.mark.parametrize("impl", ["fused", "hf"])
def test_per_sample_sums_match_each_sample_alone(impl):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(), attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper logits: per-sample losses far apart
        model.get_output_embeddings().weight.mul_(20)
    samples = _samples(model.config.vocab_size)
    batch = collate_packed(samples)
    part = LMHeadLoss(model, impl=impl, chunk_size=8)
    assert loss_parts(part) == [part]
    kw = dict(targets=batch["targets"], target_weights=batch["target_weights"], segment_ids=batch["segment_ids"],
              **model_inputs(batch, "sdpa"))
    with torch.no_grad():
        plain = float(part(**kw))
        assert part.segment_loss_sums is None  # not tracked unless asked
        part.track_segments = True
        tracked = float(part(**kw))
    ref_loss, ref_w = _reference(model, samples)
    got_loss, got_w = part.segment_loss_sums.tolist(), part.segment_weight_sums.tolist()
    # one fp32 decoder pass (packed, block-diagonal mask) against a float64 log-softmax of unpacked forwards
    for got, want in zip(got_loss, ref_loss):
        assert abs(got - want) < fp_tol(torch.float32, abs(want), k=TINY_DECODER_K), (got_loss, ref_loss)
    assert got_w == pytest.approx(ref_w, rel=fp_tol(torch.float32, 1.0, k=max(LENGTHS)))
    assert abs(tracked - plain) < fp_tol(torch.float32, abs(plain), k=sum(LENGTHS))
    # a leaky attribution (the samples' sums in another order) is far outside those bounds
    assert abs(got_loss[0] - ref_loss[1]) > 100 * fp_tol(torch.float32, abs(ref_loss[1]), k=TINY_DECODER_K)
