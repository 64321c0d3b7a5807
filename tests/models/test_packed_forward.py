"""The packed forward of a real HF decoder (tiny Qwen3 / Llama built from config, fp32, CPU) equals the
separate per-sample forwards: logits and per-token loss within the fp32 tolerance of a tiny-decoder forward
(~3e-5 for the logits), and gradients too.

The reference is the plain single-sample forward (no packing code involved); the packed side goes
through PackingCollator + model_inputs exactly as the trainer does. A leaky variant (packed row with
one causal mask over the whole row) is asserted to differ, so these tests fail if the mask leaks."""

import json

import pytest
import torch
import torch.nn.functional as F
from _tolerance import TINY_DECODER_K, fp_tol
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from distthink.data.packing import IGNORE_INDEX, PackedBatchSampler, PackingCollator
from distthink.data.types import EncodedSample
from distthink.models.attention import model_inputs

VOCAB = 96


def _tol(refs) -> float:
    """Two fp32 forwards of the tiny decoder that reduce in another order (row lengths, masks, padding): scaled by
    the largest reference value (logits ~0.6, per-token losses ~ln 96)."""
    return fp_tol(torch.float32, max(r.abs().max().item() for r in refs), k=TINY_DECODER_K)


def _tiny(family: str, attn: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  attn_implementation=attn)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.float().eval()


def _samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, (length, prompt) in enumerate([(9, 4), (13, 5), (1, 0), (6, 2), (11, 3)]):
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        weights = [0.0] * prompt + [0.5 + 0.1 * n] * (length - prompt)
        out.append(EncodedSample(ids, labels, weights))
    return out


def _per_sample_reference(model, samples):
    """Logits and per-token (target-aligned) losses of each sample run alone."""
    logits, losses = [], []
    for s in samples:
        ids = torch.tensor([s.input_ids])
        lg = model(input_ids=ids).logits[0]
        tgt = torch.tensor(s.labels[1:] + [IGNORE_INDEX])
        losses.append(F.cross_entropy(lg, tgt, ignore_index=IGNORE_INDEX, reduction="none"))
        logits.append(lg)
    return logits, losses


def _split_rows(batch, logits):
    """Per-sample slices of packed/padded outputs, using segment_ids (independent of the collator's
    own offsets bookkeeping)."""
    losses = F.cross_entropy(logits.reshape(-1, VOCAB), batch["targets"].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(batch["targets"].shape)
    seg = batch["segment_ids"]
    out = []
    for i in range(batch["num_samples"]):
        where = seg == i
        out.append((logits[where], losses[where]))
    return out


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [True, False])
def test_packed_forward_equals_per_sample(family, attn, packed):
    model = _tiny(family, attn)
    samples = _samples()
    ref_logits, ref_losses = _per_sample_reference(model, samples)
    batch = PackingCollator(pad_token_id=0, packed=packed, pad_to_multiple_of=8)(samples)
    with torch.no_grad():
        logits = model(**model_inputs(batch, model.config._attn_implementation)).logits
    for (lg, ls), rlg, rls in zip(_split_rows(batch, logits), ref_logits, ref_losses):
        torch.testing.assert_close(lg, rlg, atol=_tol(ref_logits), rtol=0)
        torch.testing.assert_close(ls, rls, atol=_tol(ref_losses), rtol=0)


def test_weighted_loss_and_gradients_match_per_sample():
    """The weighted loss sum and every parameter gradient are the same packed or one by one."""
    samples = _samples()
    ref = _tiny("qwen3", "sdpa")
    total = 0.0
    for s in samples:
        lg = ref(input_ids=torch.tensor([s.input_ids])).logits[0]
        tgt = torch.tensor(s.labels[1:] + [IGNORE_INDEX])
        w = torch.tensor(s.loss_weights[1:] + [0.0])
        total = total + (F.cross_entropy(lg, tgt, ignore_index=IGNORE_INDEX, reduction="none") * w).sum()
    total.backward()

    model = _tiny("qwen3", "sdpa")
    batch = PackingCollator()(samples)
    logits = model(**model_inputs(batch, "sdpa")).logits
    per_tok = F.cross_entropy(logits.view(-1, VOCAB), batch["targets"].view(-1), ignore_index=IGNORE_INDEX,
                              reduction="none")
    packed_total = (per_tok * batch["target_weights"].view(-1)).sum()
    packed_total.backward()
    torch.testing.assert_close(packed_total, total, atol=_tol([total]), rtol=0)  # a sum of positive terms
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        # forward + backward chain of the tiny decoder, scaled by the tensor's largest gradient
        tol = fp_tol(torch.float32, p.grad.abs().max(), k=2 * TINY_DECODER_K)
        torch.testing.assert_close(q.grad, p.grad, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")


def _max_leak(model, batch, **kwargs):
    """(largest logit difference between a variant forward and the per-sample reference over samples 2+,
    the logits' tolerance)."""
    ref_logits, _ = _per_sample_reference(model, _samples())
    with torch.no_grad():
        logits = model(**kwargs).logits
    parts = _split_rows(batch, logits)
    return max((lg - rlg).abs().max().item() for (lg, _), rlg in list(zip(parts, ref_logits))[1:]), _tol(ref_logits)


def test_leaky_mask_would_be_detected():
    """Sanity of the equality test itself: a packed row run with one causal mask over the whole row
    (what happens when nothing tells the model where samples end) differs far beyond the tolerance."""
    model = _tiny("qwen3", "sdpa")
    batch = PackingCollator()(_samples())
    whole_row_causal = torch.ones(1, 1, *batch["input_ids"].shape[-1:] * 2, dtype=torch.bool).tril_()
    leak, tol = _max_leak(model, batch, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=whole_row_causal, use_cache=False)
    assert leak > 1000 * tol


def test_hf_implicit_packing_detection_needs_use_cache_false():
    """Why model_inputs passes an explicit mask: transformers derives the block-diagonal mask from
    position_ids only when attention_mask is None *and* no KV cache exists. With use_cache=False it
    works; with the config default (use_cache=True) the cache is created first and the detection is
    skipped. The second half documents transformers' behaviour; if it changes, the explicit mask is
    still correct and this assertion can go."""
    model = _tiny("qwen3", "sdpa")
    batch = PackingCollator()(_samples())
    implicit = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None)
    leak, tol = _max_leak(model, batch, use_cache=False, **implicit)
    assert leak < tol
    assert model.config.use_cache is True
    leak, tol = _max_leak(model, batch, **implicit)
    assert leak > 1000 * tol


def test_real_encoded_samples_through_sampler_loader_and_model():
    """End to end on real encode_chat output: bundled data -> sampler -> DataLoader + collator -> tiny
    Qwen3 (tiny_qwen3_config) packed forward == per-sample forward, for every micro-batch."""
    from distthink.commands.inspect import BUNDLED_DATA
    from distthink.data.chat import ChatPolicy
    from distthink.data.dataset import build_sft_dataset
    from distthink.models.tiny import tiny_qwen3_config, tiny_tokenizer

    tok = tiny_tokenizer("qwen3")
    records = [json.loads(line) for line in BUNDLED_DATA.read_text(encoding="utf-8").splitlines()[:12]]
    samples, _ = build_sft_dataset(records, tok, ChatPolicy())
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(attn_implementation="sdpa")).float().eval()
    sampler = PackedBatchSampler([len(s) for s in samples], 256, seed=0)
    loader = DataLoader(samples, batch_sampler=sampler, collate_fn=PackingCollator(pad_token_id=tok.pad_token_id))
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 256
        with torch.no_grad():
            logits = model(**model_inputs(batch, "sdpa")).logits
            for i in range(batch["num_samples"]):
                where = batch["segment_ids"] == i
                ref = model(input_ids=batch["input_ids"][where][None]).logits[0]
                torch.testing.assert_close(logits[where], ref, atol=_tol([ref]), rtol=0)
        seen += batch["num_samples"]
    assert seen == len(samples) == 12


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A plain-torch stand-in for flash-attn varlen, registered as a transformers attention function:
    causal attention run separately on each [cu[i], cu[i+1]) slice of the flattened (B*T) tokens, exactly
    what flash_attn_varlen_func computes. It reads only the cu_seq_lens kwargs (no mask), so it checks
    that model_inputs' flash kwargs reach every attention layer through the HF model and delimit samples."""
    B, H, T, D = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a plain (unpacked) forward: one sequence per row
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    rep = H // key.shape[1]
    q = query.transpose(1, 2).reshape(B * T, H, D)
    k = key.repeat_interleave(rep, dim=1).transpose(1, 2).reshape(B * T, H, D)
    v = value.repeat_interleave(rep, dim=1).transpose(1, 2).reshape(B * T, H, D)
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[a:b] = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                  v[a:b].transpose(0, 1), is_causal=True,
                                                  scale=scaling).transpose(0, 1)
    return out.view(B, T, H, D), None


@pytest.mark.parametrize("packed", [True, False])
def test_flash_varlen_kwargs_delimit_samples(packed):
    """CPU check of the GPU path's plumbing: the kwargs model_inputs gives flash_attention_2
    (cu_seq_lens_q/k, max_length_q/k, position_ids, no mask) yield per-sample-equal logits when the
    attention kernel is a varlen reference. The real flash-attn kernel itself needs a GPU."""
    from transformers import AttentionInterface

    AttentionInterface.register("distthink_varlen_reference", _varlen_reference_attention)
    model = _tiny("qwen3", "distthink_varlen_reference")
    samples = _samples()
    ref_logits, ref_losses = _per_sample_reference(model, samples)
    batch = PackingCollator(packed=packed, pad_to_multiple_of=8)(samples)
    kwargs = model_inputs(batch, "flash_attention_2")
    assert kwargs["attention_mask"] is None
    with torch.no_grad():
        logits = model(**kwargs).logits
    for (lg, ls), rlg, rls in zip(_split_rows(batch, logits), ref_logits, ref_losses):
        torch.testing.assert_close(lg, rlg, atol=_tol(ref_logits), rtol=0)
        torch.testing.assert_close(ls, rls, atol=_tol(ref_losses), rtol=0)
    # and without the cu_seq_lens kwargs the same kernel leaks across the packed row, far beyond the tolerance
    if packed:
        leaky = {k: v for k, v in kwargs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        with torch.no_grad():
            logits = model(**leaky).logits
        assert (logits[batch["segment_ids"] == 1] - ref_logits[1]).abs().max() > 1000 * _tol(ref_logits)
