import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol
from torch import nn

from distthink.errors import DistthinkError
from distthink.models.inject import (
    PlaceholderSlot,
    Projector,
    add_placeholder_tokens,
    embed_with_injection,
    inject_placeholders,
)

U, I = 90, 91  # placeholder ids in a tiny vocab
H = 16


def _naive_inject(input_ids, embeds, slots, segment_ids=None):
    """Reference: explicit Python loops, sample by sample, in order of appearance."""
    out = embeds.clone()
    B, T = input_ids.shape
    seg = segment_ids if segment_ids is not None else torch.arange(B)[:, None].expand(B, T)
    for slot in slots:
        vec = slot.flat_vectors()
        n_samples = int(seg.max()) + 1
        cursor = 0
        for s in range(n_samples):
            for b in range(B):
                for t in range(T):
                    if seg[b, t] == s and input_ids[b, t] == slot.token_id:
                        out[b, t] = vec[cursor]
                        cursor += 1
        assert cursor == vec.shape[0]
    return out


def test_matches_naive_reference_rows_and_two_kinds():
    torch.manual_seed(0)
    ids = torch.tensor([[1, U, 2, I, I, 3], [U, 4, I, 5, 6, 7]])
    emb = torch.randn(2, 6, H)
    slots = [PlaceholderSlot(U, torch.randn(2, H), counts=torch.tensor([1, 1]), name="<UserID>"),
             PlaceholderSlot(I, torch.randn(3, H), counts=torch.tensor([2, 1]), name="<ItemID>")]
    got = inject_placeholders(ids, emb, slots)
    torch.testing.assert_close(got, _naive_inject(ids, emb, slots))
    # untouched positions are the original embeddings
    mask = (ids != U) & (ids != I)
    torch.testing.assert_close(got[mask], emb[mask])


def test_packed_segments_order_is_sample_major():
    # Two packed rows; segment ids are global across the micro-batch. Row 1 holds samples 1 and 2.
    torch.manual_seed(1)
    ids = torch.tensor([[U, 1, U, 2, 0, 0], [3, U, 4, U, U, 5]])
    seg = torch.tensor([[0, 0, 0, 0, -1, -1], [1, 1, 2, 2, 2, 2]])
    vec = torch.randn(5, H)
    slot = PlaceholderSlot(U, vec, counts=torch.tensor([2, 1, 2]))
    got = inject_placeholders(ids, torch.zeros(2, 6, H), [slot], segment_ids=seg)
    torch.testing.assert_close(got[0, 0], vec[0])
    torch.testing.assert_close(got[0, 2], vec[1])
    torch.testing.assert_close(got[1, 1], vec[2])
    torch.testing.assert_close(got[1, 3], vec[3])
    torch.testing.assert_close(got[1, 4], vec[4])
    torch.testing.assert_close(got, _naive_inject(ids, torch.zeros(2, 6, H), [slot], seg))


def test_k_tokens_per_id():
    ids = torch.tensor([[1, U, U, 2, U, U]])
    vec = torch.arange(2 * 2 * H, dtype=torch.float).view(2, 2, H)  # 2 ids, k=2
    got = inject_placeholders(ids, torch.zeros(1, 6, H), [PlaceholderSlot(U, vec, counts=torch.tensor([2]))])
    torch.testing.assert_close(got[0, [1, 2, 4, 5]], vec.view(4, H))


def test_mismatch_names_the_sample():
    ids = torch.tensor([[1, U, 2], [U, U, 3], [4, U, 5]])
    slot = PlaceholderSlot(U, torch.randn(3, H), counts=torch.tensor([1, 1, 1]), name="<UserID>")
    with pytest.raises(DistthinkError, match=r"sample 1 \(row 1\) has 2 <UserID>"):
        inject_placeholders(ids, torch.zeros(3, 3, H), [slot])


def test_mismatch_in_packed_row_names_segment():
    ids = torch.tensor([[U, 1, 2, U, U]])
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    slot = PlaceholderSlot(U, torch.randn(2, H), counts=torch.tensor([1, 1]), name="<|graph|>")
    with pytest.raises(DistthinkError, match=r"sample 1 \(packed segment 1, row 0\) has 2 <\|graph\|>"):
        inject_placeholders(ids, torch.zeros(1, 5, H), [slot], segment_ids=seg)


def test_total_mismatch_without_counts_raises():
    ids = torch.tensor([[1, U, 2], [U, U, 3]])
    with pytest.raises(DistthinkError, match=r"3 token id 90 placeholder token\(s\) but 2 vector"):
        inject_placeholders(ids, torch.zeros(2, 3, H), [PlaceholderSlot(U, torch.randn(2, H))])


def test_placeholder_on_padding_and_wrong_width_raise():
    ids = torch.tensor([[U, 1, U]])
    seg = torch.tensor([[0, 0, -1]])
    with pytest.raises(DistthinkError, match="padding"):
        inject_placeholders(ids, torch.zeros(1, 3, H), [PlaceholderSlot(U, torch.randn(2, H))], segment_ids=seg)
    with pytest.raises(DistthinkError, match="hidden size"):
        inject_placeholders(ids, torch.zeros(1, 3, H), [PlaceholderSlot(U, torch.randn(2, H + 1))])


def test_gradients_flow_to_projector_and_embeddings():
    torch.manual_seed(2)
    proj = Projector(8, H, mult=2, k=1)
    emb = nn.Embedding(100, H)
    ids = torch.tensor([[1, U, 2], [3, 4, U]])
    out = inject_placeholders(ids, emb(ids), [PlaceholderSlot(U, proj(torch.randn(2, 8)))])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert emb.weight.grad[1].abs().sum() > 0
    # The placeholder's own embedding row is replaced, so it receives no gradient.
    assert emb.weight.grad[U].abs().sum() == 0


def test_projector_shapes_and_errors():
    p = Projector(8, H, k=3)  # default mult=10
    assert p.net[0].out_features == 80 and p.net[2].out_features == 3 * H
    assert p(torch.randn(5, 8)).shape == (5, 3, H)
    with pytest.raises(DistthinkError):
        p(torch.randn(5, 7))


def _tiny_qwen3(vocab):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def test_changing_one_vector_changes_logits_at_that_prompt_only():
    model = _tiny_qwen3(128)
    ids = torch.tensor([[5, 6, U, 7, 8], [9, U, 10, 11, 12], [13, 14, 15, U, 16]])
    vec = torch.randn(3, 64)

    def logits(v):
        with torch.no_grad():
            e = embed_with_injection(model, ids, [PlaceholderSlot(U, v, counts=torch.ones(3, dtype=torch.long))])
            return model(inputs_embeds=e).logits

    base = logits(vec)
    v2 = vec.clone()
    v2[1] += 1.0  # change sample 1's vector only
    changed = logits(v2)
    # the other rows are bit-identical (same shapes, no path between rows): the default tolerance is not used
    torch.testing.assert_close(changed[0], base[0])
    torch.testing.assert_close(changed[2], base[2])
    # sample 1: positions before its placeholder are unchanged (causal), at/after it they change: by far more
    # than the tiny decoder's fp32 tolerance (measured 0.08, i.e. ~3000x)
    torch.testing.assert_close(changed[1, :1], base[1, :1])
    tol = fp_tol(torch.float32, base.abs().max(), k=TINY_DECODER_K)
    assert (changed[1, 1:] - base[1, 1:]).abs().amax(dim=-1).min() > 100 * tol


def test_embed_with_injection_refuses_ids_outside_vocab():
    model = _tiny_qwen3(64)
    with pytest.raises(DistthinkError, match="add_placeholder_tokens"):
        embed_with_injection(model, torch.tensor([[1, U]]), [PlaceholderSlot(U, torch.randn(1, 64))])


def test_add_placeholder_tokens_real_tokenizer(qwen3_tokenizer):
    import copy

    tok = copy.deepcopy(qwen3_tokenizer)
    n_before = len(tok)
    model = _tiny_qwen3(n_before)  # exactly the tokenizer size: must grow
    ids = add_placeholder_tokens(tok, ["<UserID>", "<ItemID>", "<|graph|>"], model=model)
    assert len(tok) == n_before + 3
    assert sorted(ids.values()) == [n_before, n_before + 1, n_before + 2]
    assert model.get_input_embeddings().weight.shape[0] == n_before + 3
    # one id per placeholder inside text; idempotent; existing special tokens kept
    enc = tok.encode("user <UserID> likes <ItemID><ItemID>", add_special_tokens=False)
    assert enc.count(ids["<UserID>"]) == 1 and enc.count(ids["<ItemID>"]) == 2
    again = add_placeholder_tokens(tok, ["<UserID>"], model=model)
    assert again == {"<UserID>": ids["<UserID>"]} and len(tok) == n_before + 3
    assert "<|im_start|>" in tok.all_special_tokens


def test_add_placeholder_tokens_never_shrinks_embeddings(qwen3_tokenizer):
    import copy

    tok = copy.deepcopy(qwen3_tokenizer)
    big = len(tok) + 100  # like Qwen3's 151936-row matrix
    model = _tiny_qwen3(big)
    add_placeholder_tokens(tok, ["<|graph|>"], model=model)
    assert model.get_input_embeddings().weight.shape[0] == big


def test_no_placeholders_and_no_vectors_is_a_no_op():
    emb = torch.randn(2, 3, H)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = inject_placeholders(ids, emb, [PlaceholderSlot(U, torch.zeros(0, H), counts=torch.tensor([0, 0]))])
    torch.testing.assert_close(out, emb)
    assert inject_placeholders(ids, emb, []) is emb


def test_inplace_matches_out_of_place_with_the_same_gradients():
    torch.manual_seed(3)
    ids = torch.tensor([[1, U, 2, I], [U, 4, I, I]])
    grads = []
    outs = []
    for inplace in (False, True):
        torch.manual_seed(4)
        emb = nn.Embedding(100, H)
        proj = Projector(4, H, mult=2)
        x = torch.randn(2, 4)
        e = emb(ids)
        out = inject_placeholders(ids, e, [PlaceholderSlot(U, proj(x), counts=torch.tensor([1, 1])),
                                           PlaceholderSlot(I, torch.ones(3, H), counts=torch.tensor([1, 2]))],
                                  inplace=inplace)
        assert (out is e) == inplace
        (out.sin().sum()).backward()
        outs.append(out.detach())
        grads.append([emb.weight.grad.clone()] + [p.grad.clone() for p in proj.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_embed_with_injection_trains_frozen_model_projector_only():
    model = _tiny_qwen3(128)
    model.requires_grad_(False)
    proj = Projector(8, 64, mult=2)
    ids = torch.tensor([[5, U, 7], [U, 9, 10]])
    e = embed_with_injection(model, ids, [PlaceholderSlot(U, proj(torch.randn(2, 8)).squeeze(1))])
    model(inputs_embeds=e).logits.sum().backward()
    assert all(p.grad is not None for p in proj.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_embed_with_injection_under_enable_input_require_grads():
    # LoRA + gradient checkpointing: HF makes the frozen embedding's output a grad-requiring leaf.
    model = _tiny_qwen3(128)
    model.requires_grad_(False)
    model.enable_input_require_grads()
    proj = Projector(8, 64, mult=2)
    ids = torch.tensor([[5, U, 7]])
    e = embed_with_injection(model, ids, [PlaceholderSlot(U, proj(torch.randn(1, 8)))])
    model(inputs_embeds=e).logits.sum().backward()
    assert all(p.grad is not None for p in proj.parameters())


def test_inplace_on_non_contiguous_embeds_still_injects():
    emb = torch.zeros(3, 2, H).transpose(0, 1)  # (2, 3, H), non-contiguous
    ids = torch.tensor([[1, U, 2], [3, 4, U]])
    vec = torch.randn(2, H)
    out = inject_placeholders(ids, emb, [PlaceholderSlot(U, vec)], inplace=True)
    torch.testing.assert_close(out[0, 1], vec[0])
    torch.testing.assert_close(out[1, 2], vec[1])
