"""MoLoRA layer and gate: exactness against explicit per-token / per-adapter sums, gate branches on crafted
similarities, gradient isolation of unused experts, packed rows through a real tiny Qwen3 (fp32, CPU).

References are deliberately naive: Python loops over tokens and adapters with separate A_e / B_e matrices
in float64, never the stacked GEMM path under test."""

import math

import pytest
import torch
import torch.nn.functional as F
from _tolerance import TINY_DECODER_K, fp_tol
from torch import nn

from distthink.data.packing import collate_packed
from distthink.data.types import EncodedSample
from distthink.errors import ConfigError, DistthinkError
from distthink.models.attention import model_inputs
from distthink.models.molora import (
    GateSlot,
    MoLoRALinear,
    apply_molora,
    clear_gates,
    global_gate,
    hard_gate,
    molora_gates,
    molora_layers,
    set_gates,
    tokens_from_samples,
)
from distthink.tasks.thinkrec.gate import (
    BRANCH_EXPERT,
    BRANCH_FUSE,
    BRANCH_GLOBAL,
    EntropyGate,
    GateConfig,
    branch_counts,
    entropy_gate,
)


def _layer(k=3, r=4, d_in=24, d_out=16, alpha=8.0, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    layer = MoLoRALinear(base, k, r, alpha, dropout, GateSlot(k + 1))
    with torch.no_grad():  # non-zero B so every adapter contributes
        layer.lora_B.normal_(0, 0.15)
        layer.lora_A.normal_(0, 0.15)
    return layer


def _explicit(layer: MoLoRALinear, x: torch.Tensor, token_gates: torch.Tensor, absolute=False) -> torch.Tensor:
    """y[b,t] = W x + bias + sum_e g[b,t,e] * s * B_e (A_e x), token by token, adapter by adapter, float64.
    absolute=True evaluates the same sums on |.| of every factor: sum|terms|, the scale of the rounding error."""
    f = torch.abs if absolute else (lambda t: t)
    W = f(layer.base_layer.weight.double())
    bias = layer.base_layer.bias
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = f(x[b, t].double())
            y = W @ xt + (f(bias.double()) if bias is not None else 0)
            for e in range(layer.num_adapters):
                A, B = (f(m.double()) for m in layer.adapter_weights(e))
                y = y + f(token_gates[b, t, e].double()) * layer.scaling * (B @ (A @ xt))
            out[b, t] = y
    return out


def _tol(layer: MoLoRALinear, x: torch.Tensor, token_gates: torch.Tensor) -> float:
    """fp32 layer output vs float64: chained reductions over d_in (A x) and E*r (B h), scaled by sum|terms|."""
    return fp_tol(torch.float32, _explicit(layer, x, token_gates, absolute=True).max(),
                  k=layer.in_features + layer.num_adapters * layer.r)


def _mixed_sample_gates(k: int, s: int, seed: int = 1) -> torch.Tensor:
    """S gates mixing every kind: soft over experts, one-hot expert, one-hot global, soft incl. global."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(s):
        kind = i % 4
        if kind == 0:
            w = torch.zeros(k + 1)
            w[:k] = torch.softmax(torch.randn(k, generator=g), 0)
        elif kind == 1:
            w = F.one_hot(torch.tensor(i % k), k + 1).float()
        elif kind == 2:
            w = F.one_hot(torch.tensor(k), k + 1).float()
        else:
            w = torch.softmax(torch.randn(k + 1, generator=g), 0)
        rows.append(w)
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_layer_equals_explicit_sum_mixed_gates_packed_rows(k):
    layer = _layer(k=k)
    # two packed rows: row 0 holds samples 0,1,2 + 2 padding tokens, row 1 holds samples 3,4,5
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1], [3, 3, 4, 4, 4, 4, 5, 5, 5, 5]])
    gates = _mixed_sample_gates(k, 6)
    x = torch.randn(2, 10, layer.in_features)
    set_gates(layer, gates, segment_ids=seg)
    y = layer(x)
    tok = gates[seg.clamp_min(0)] * (seg >= 0).unsqueeze(-1)
    ref = _explicit(layer, x, tok)
    assert (y.double() - ref).abs().max().item() < _tol(layer, x, tok)
    # padding tokens get the base output only
    base = layer.base_layer(x)
    assert torch.equal(y[0, 8:], base[0, 8:])
    # tokens of samples gated one-hot on the global adapter: W x + global delta, nothing else
    A, B = layer.adapter_weights(k)
    fallback = (gates[seg.clamp_min(0), k] == 1) & (seg >= 0)
    assert fallback.any()
    want = base[fallback] + layer.scaling * (x[fallback] @ A.T @ B.T)
    assert (y[fallback] - want).abs().max().item() < _tol(layer, x, tok)  # both fp32, same error model


def test_per_row_gates_and_token_gates_agree():
    layer = _layer(k=4)
    x = torch.randn(3, 7, layer.in_features)
    gates = _mixed_sample_gates(4, 3)
    set_gates(layer, gates)                                # one sample per row, broadcast over positions
    y_rows = layer(x)
    set_gates(layer, token_gates=gates[:, None, :].expand(3, 7, 5).clone())
    assert torch.equal(layer(x), y_rows)
    seg = torch.arange(3)[:, None].expand(3, 7)
    set_gates(layer, gates, segment_ids=seg)
    assert torch.equal(layer(x), y_rows)
    tok = gates[:, None, :].expand(3, 7, 5)
    assert (y_rows.double() - _explicit(layer, x, tok)).abs().max() < _tol(layer, x, tok)


def test_gradients_equal_explicit_reference_and_unused_expert_gets_zero():
    layer = _layer(k=4, dropout=0.0)
    x = torch.randn(2, 6, layer.in_features)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3]])
    gates = torch.tensor([[0.7, 0.0, 0.3, 0.0, 0.0],   # expert 1 never used by any sample
                          [0.0, 0.0, 0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 1.0],
                          [0.2, 0.0, 0.2, 0.2, 0.4]])
    grad_out = torch.randn(2, 6, layer.out_features)
    set_gates(layer, gates, segment_ids=seg)
    (layer(x) * grad_out).sum().backward()
    def reference(absolute):
        """Separate leaf A_e, B_e per adapter, float64, explicit sum; absolute=True: on |.| of every factor, whose
        gradients are sum|terms| of the true ones (the scale of their rounding errors)."""
        f = torch.abs if absolute else (lambda t: t)
        As = [f(a.detach().double()).clone().requires_grad_() for a in
              (layer.adapter_weights(e)[0] for e in range(5))]
        Bs = [f(b.detach().double()).clone().requires_grad_() for b in
              (layer.adapter_weights(e)[1] for e in range(5))]
        tok = f(gates[seg].double())
        xd = f(x.double())
        y = F.linear(xd, f(layer.base_layer.weight.double()), f(layer.base_layer.bias.double()))
        for e in range(5):
            y = y + tok[..., e:e + 1] * layer.scaling * ((xd @ As[e].T) @ Bs[e].T)
        (y * f(grad_out.double())).sum().backward()
        return As, Bs

    (As, Bs), (absA, absB) = reference(False), reference(True)
    # fp32 backward: chained reductions over d_out (grad_out B), the tokens (weight grads) and d_in (A x)
    k = layer.out_features + x.shape[0] * x.shape[1] + layer.in_features
    r = layer.r
    for e in range(5):
        ga = layer.lora_A.grad[e * r:(e + 1) * r]
        gb = layer.lora_B.grad[:, e * r:(e + 1) * r]
        assert (ga.double() - As[e].grad).abs().max() <= fp_tol(torch.float32, absA[e].grad.max(), k=k)
        assert (gb.double() - Bs[e].grad).abs().max() <= fp_tol(torch.float32, absB[e].grad.max(), k=k)
    assert torch.count_nonzero(layer.lora_A.grad[r:2 * r]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, r:2 * r]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[:r]) > 0 and torch.count_nonzero(layer.lora_B.grad[:, :r]) > 0
    assert layer.base_layer.weight.grad is not None  # plain layer: freezing is apply_molora's job


def test_dropout_is_one_mask_on_the_input_as_peft():
    layer = _layer(k=2, dropout=0.5)
    layer.train()
    x = torch.randn(1, 5, layer.in_features)
    gates = _mixed_sample_gates(2, 1)
    set_gates(layer, gates)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    xd = F.dropout(x, 0.5, training=True)
    base = layer.base_layer(x)
    tok = gates[:, None, :].expand(1, 5, 3)
    want = base.double() + (_explicit(layer, xd, tok) - layer.base_layer(xd).double())
    # y's fp32 error plus that of want's fp32 base_layer(xd)
    assert (y.double() - want).abs().max() < _tol(layer, x, tok) + _tol(layer, xd, tok)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_missing_or_stale_gates_raise():
    layer = _layer(k=2)
    x = torch.randn(2, 4, layer.in_features)
    with pytest.raises(DistthinkError, match="without gates"):
        layer(x)
    set_gates(layer, token_gates=torch.rand(2, 5, 3))
    with pytest.raises(DistthinkError, match="do not fit"):
        layer(x)
    with pytest.raises(DistthinkError, match="sample gates"):
        set_gates(layer, torch.rand(2, 3), segment_ids=torch.tensor([[0, 1, 2, 2]]))
    with pytest.raises(DistthinkError):
        set_gates(layer, token_gates=torch.rand(2, 4, 7))  # wrong E
    with molora_gates(layer, torch.rand(2, 3)):
        layer(x)
    with pytest.raises(DistthinkError, match="without gates"):
        layer(x)


def test_tokens_from_samples_padding_is_zero():
    g = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    seg = torch.tensor([[0, 0, 1, -1]])
    tok = tokens_from_samples(g, seg)
    assert torch.equal(tok, torch.tensor([[[0.2, 0.8], [0.2, 0.8], [1.0, 0.0], [0.0, 0.0]]]))


# ------------------------------------------------------------------------------------------------ gate
def _crafted_users(target_w: torch.Tensor, tau: float):
    """Orthonormal centroids e_0..e_{K-1} in R^{K+1} and users whose softmax(cos/tau) is exactly target_w:
    cos_k = tau * (log w_k - log max w), the extra coordinate fills the unit norm."""
    s, k = target_w.shape
    cos = tau * (target_w.log() - target_w.log().max(dim=1, keepdim=True).values)
    assert (cos.pow(2).sum(1) <= 1).all()
    users = torch.cat([cos, (1 - cos.pow(2).sum(1, keepdim=True)).clamp_min(0).sqrt()], 1).double()
    cents = torch.eye(k, k + 1).double()
    return users, cents


def _expected_branch(w, margin=0.6, frac=0.95):
    """The rule in plain Python on one weight vector, in ThinkRec's order (entropy test first)."""
    n = len(w)
    h = -sum(p * math.log(p) for p in w if p > 0)
    if h > frac * math.log(n):
        return BRANCH_GLOBAL
    return BRANCH_EXPERT if max(w) > 0.5 + margin / n else BRANCH_FUSE


def _cases(n: int) -> list[list[float]]:
    thr = 0.5 + 0.6 / n
    eps = 0.01
    expert = [thr + 0.01] + [(1 - thr - 0.01) / (n - 1)] * (n - 1)
    expert_edge = [thr + 2e-3] + [(1 - thr - 2e-3) / (n - 1)] * (n - 1)
    fuse = [thr - 0.03, 1 - (thr - 0.03) - (n - 2) * eps] + [eps] * (n - 2)
    fuse_edge = [thr - 2e-3, 1 - (thr - 2e-3) - (n - 2) * eps] + [eps] * (n - 2)
    flat = [1 / n + 0.01] + [(1 - 1 / n - 0.01) / (n - 1)] * (n - 1)
    return [expert, expert_edge, fuse, fuse_edge, flat, list(reversed(expert)), list(reversed(fuse))]


@pytest.mark.parametrize("n", range(2, 9))
def test_entropy_gate_branches_on_crafted_similarities(n):
    cases = torch.tensor(_cases(n), dtype=torch.float64)
    expected = [_expected_branch(w) for w in cases.tolist()]
    assert set(expected) == {BRANCH_EXPERT, BRANCH_GLOBAL, BRANCH_FUSE}, "test data must cover all 3 branches"
    users, cents = _crafted_users(cases, 0.1)
    dec = entropy_gate(users, cents)
    assert dec.branch.tolist() == expected
    # float32 cosines (length n+1 dot products, |cos| <= 1) are scaled by 1/tau = 10 before the softmax; the
    # branch edges sit 2e-3 away, ~100x this bound
    tol = fp_tol(torch.float32, 1 / 0.1, k=n + 1)
    assert (dec.probs.double() - cases).abs().max() < tol
    for i, br in enumerate(expected):
        w = dec.weights[i]
        assert abs(w.sum().item() - 1) < fp_tol(torch.float32, 1.0, k=n + 1)  # n+1 float32 terms summing to 1
        if br == BRANCH_EXPERT:
            assert torch.equal(w, F.one_hot(cases[i].argmax(), n + 1).float())
        elif br == BRANCH_GLOBAL:
            assert torch.equal(w, F.one_hot(torch.tensor(n), n + 1).float())
        else:
            assert w[n] == 0 and (w[:n].double() - cases[i]).abs().max() < tol
    # per instance: a permuted batch gives the permuted decisions, single samples give the same answer
    perm = torch.randperm(len(cases))
    assert torch.equal(entropy_gate(users[perm], cents).branch, dec.branch[perm])
    assert entropy_gate(users[2:3], cents).branch.item() == expected[2]
    assert branch_counts(dec.branch) == {"expert": expected.count(0), "global": expected.count(1),
                                         "fuse": expected.count(2)}


def test_entropy_gate_settings_and_scaler():
    k, d = 4, 6
    g = torch.Generator().manual_seed(0)
    cents = torch.randn(k, d, generator=g)
    z = torch.randn(32, d, generator=g)
    cfg = GateConfig(tau=0.3, expert_margin=0.2, entropy_frac=0.9, space="standardised")
    dec = entropy_gate(z, cents, cfg)
    want = [_expected_branch(w, 0.2, 0.9) for w in torch.softmax(F.cosine_similarity(
        z.double()[:, None], cents.double()[None], dim=-1) / 0.3, -1).tolist()]
    assert dec.branch.tolist() == want
    mean, scale = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    gate = EntropyGate(cents, mean, scale, cfg)
    raw = z * scale + mean
    assert torch.equal(gate(raw).branch, dec.branch)
    # the float32 round trip z -> raw -> (raw - mean) / scale moves z by ~eps * |raw| / scale, i.e. the cosines by
    # ~eps * m (m below), which 1/tau scales before the softmax
    m = ((raw.abs() / scale).norm(dim=1) / z.norm(dim=1)).max()
    assert (gate(raw).weights - dec.weights).abs().max() < fp_tol(torch.float32, m / 0.3, k=d)
    back = EntropyGate.from_json(gate.to_json())
    assert torch.equal(back(raw).weights, gate(raw).weights) and back.cfg == cfg
    # space raw (ThinkRec): the raw vector against the centroids as given, the scaler unused
    raw_gate = EntropyGate(cents, mean, scale, GateConfig(tau=0.3, expert_margin=0.2, entropy_frac=0.9))
    assert raw_gate.cfg.space == "raw" and torch.equal(raw_gate(z).weights, dec.weights)
    assert not torch.equal(raw_gate(raw).weights, dec.weights)
    assert EntropyGate.from_json(raw_gate.to_json()).cfg.space == "raw"
    # a molora.json written before the setting holds standardised centroids
    legacy = {k: v for k, v in gate.to_json().items() if k != "space"}
    assert EntropyGate.from_json(legacy).cfg.space == "standardised"
    with pytest.raises(ConfigError):
        entropy_gate(z, cents[:1])
    with pytest.raises(ConfigError):
        entropy_gate(z, cents, GateConfig(tau=0))


def test_entropy_test_comes_first_as_thinkrec():
    """Where both tests pass for the same w, ThinkRec sends the user to the global adapter (the old order picked
    the expert). With K=2, margin 0 and entropy_frac 0.5, w = (0.6, 0.4): max w 0.6 > 0.5 and H = 0.673 nats >
    0.5 ln 2 = 0.347. Exactly at the threshold (H = entropy_frac ln K) the test is strict, as ThinkRec's `>`."""
    cfg = GateConfig(tau=0.1, expert_margin=0.0, entropy_frac=0.5)
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1]], dtype=torch.float64)
    users, cents = _crafted_users(w, 0.1)
    dec = entropy_gate(users, cents, cfg)
    assert dec.branch.tolist() == [BRANCH_GLOBAL, BRANCH_EXPERT]
    assert [_expected_branch(x, 0.0, 0.5) for x in w.tolist()] == dec.branch.tolist()
    # uniform w has H = ln K exactly: global for entropy_frac < 1, not for entropy_frac = 1 (strict >)
    flat = _crafted_users(torch.full((1, 3), 1 / 3, dtype=torch.float64), 0.1)
    assert entropy_gate(*flat, GateConfig(entropy_frac=0.99)).branch.item() == BRANCH_GLOBAL
    assert entropy_gate(*flat, GateConfig(entropy_frac=1.0)).branch.item() == BRANCH_FUSE


@pytest.mark.parametrize("n", range(2, 41))
def test_default_thresholds_never_let_the_two_orders_disagree(n):
    """With ThinkRec's 0.6 / 0.95, a w passing the margin test has at most the entropy of its top weight plus the
    rest spread evenly (the maximum-entropy completion), and that bound is below 0.95 ln K: the order of the two
    tests only matters for other settings (test above)."""
    p = 0.5 + 0.6 / n
    bound = -p * math.log(p) - (1 - p) * math.log((1 - p) / (n - 1))
    assert bound < 0.95 * math.log(n)
    w = torch.tensor([[p + 1e-4] + [(1 - p - 1e-4) / (n - 1)] * (n - 1)], dtype=torch.float64)
    # a small tau keeps the crafted cosines inside the unit ball for large K
    assert entropy_gate(*_crafted_users(w, 0.02), GateConfig(tau=0.02)).branch.item() == BRANCH_EXPERT


def test_hard_and_global_gates():
    h = hard_gate(torch.tensor([0, 2, -1, 3]), 3)
    assert h.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert torch.equal(global_gate(2, 3), hard_gate(torch.tensor([3, 3]), 3))
    with pytest.raises(DistthinkError, match="outside"):
        hard_gate(torch.tensor([4]), 3)


# --------------------------------------------------------------------------------------- tiny Qwen3 model
def _tiny_model(seed=0):
    from transformers import AutoModelForCausalLM

    from distthink.models.tiny import tiny_qwen3_config

    torch.manual_seed(seed)
    cfg = tiny_qwen3_config(vocab_size=128, pad_token_id=0, eos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                            attn_implementation="sdpa").eval()


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in molora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def _samples(lengths=(7, 5, 9, 4), vocab=128, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths:
        ids = torch.randint(0, vocab, (L,), generator=g).tolist()
        out.append(EncodedSample(ids, list(ids), [1.0] * L))
    return out


def test_packed_model_forward_equals_per_sample_forwards():
    """Packed row with 4 samples, each with its own gate, equals each sample run alone with its gate."""
    model = apply_molora(_tiny_model(), 3, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _randomise(model)
    samples = _samples()
    gates = _mixed_sample_gates(3, len(samples))
    batch = collate_packed(samples, pad_to_multiple_of=8)
    with molora_gates(model, gates, segment_ids=batch["segment_ids"]):
        packed = model(**model_inputs(batch, "sdpa")).logits[0]
    seg = batch["segment_ids"][0]
    worst = 0.0
    for i, s in enumerate(samples):
        with molora_gates(model, gates[i:i + 1]):
            alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
        worst = max(worst, (packed[seg == i] - alone).abs().max().item())
    # two fp32 forwards of the tiny decoder, reduced in another order (other shapes, masking)
    tol = fp_tol(torch.float32, packed.abs().max(), k=TINY_DECODER_K)
    assert worst < tol
    # and the gates matter: one sample with another gate changes only that sample's logits, by far more
    other = gates.clone()
    other[1] = F.one_hot(torch.tensor(3), 4).float() if gates[1, 3] != 1 else F.one_hot(torch.tensor(0), 4).float()
    with molora_gates(model, other, segment_ids=batch["segment_ids"]):
        changed = model(**model_inputs(batch, "sdpa")).logits[0]
    assert (changed[seg == 1] - packed[seg == 1]).abs().max() > 1000 * tol
    assert torch.equal(changed[seg == 0], packed[seg == 0])


def test_apply_molora_freezes_base_and_unused_expert_never_changes():
    """Hard routing (stage 3): an expert whose group has no samples gets exactly zero gradient and stays
    bit-identical over several AdamW steps (weight_decay 0); experts that saw samples change."""
    model = apply_molora(_tiny_model(), 4, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    model.train()
    _randomise(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    layers = molora_layers(model)
    before = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    samples = _samples((6, 5, 7, 4, 6))
    groups = torch.tensor([0, 2, 0, 3, 2])                  # group 1 and the global adapter: no samples
    for _ in range(3):
        batch = collate_packed(samples)
        with molora_gates(model, hard_gate(groups, 4), segment_ids=batch["segment_ids"]):
            logits = model(**model_inputs(batch, "sdpa")).logits
            loss = F.cross_entropy(logits[0], batch["targets"][0], ignore_index=-100)
            loss.backward()
        for m in layers.values():
            r = m.r
            for e in (1, 4):
                assert torch.count_nonzero(m.lora_A.grad[e * r:(e + 1) * r]) == 0
                assert torch.count_nonzero(m.lora_B.grad[:, e * r:(e + 1) * r]) == 0
        opt.step()
        opt.zero_grad()
    for n, m in layers.items():
        a0, b0 = before[n]
        r = m.r
        for e in range(5):
            same = torch.equal(m.lora_A[e * r:(e + 1) * r], a0[e * r:(e + 1) * r]) and \
                torch.equal(m.lora_B[:, e * r:(e + 1) * r], b0[:, e * r:(e + 1) * r])
            assert same == (e in (1, 4)), (n, e)


def test_gradient_checkpointing_recomputes_with_the_same_gates():
    def grads(gc: bool):
        model = apply_molora(_tiny_model(), 2, r=4, alpha=8, target_modules=["q_proj", "o_proj", "up_proj"])
        _randomise(model)
        model.train()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        batch = collate_packed(_samples())
        with molora_gates(model, _mixed_sample_gates(2, 4), segment_ids=batch["segment_ids"]):
            logits = model(**model_inputs(batch, "sdpa")).logits
            F.cross_entropy(logits[0], batch["targets"][0], ignore_index=-100).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:  # the recomputation may take other kernels: fp32 forward + backward chain of the tiny decoder
        tol = fp_tol(torch.float32, plain[n].abs().max(), k=2 * TINY_DECODER_K)
        assert (plain[n] - ckpt[n]).abs().max() <= tol, n
    # the recomputation really reads the gates: clearing them between forward and backward raises
    model = apply_molora(_tiny_model(), 2, r=4, alpha=8, target_modules=["q_proj"])
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    batch = collate_packed(_samples())
    with molora_gates(model, _mixed_sample_gates(2, 4), segment_ids=batch["segment_ids"]):
        logits = model(**model_inputs(batch, "sdpa")).logits
    with pytest.raises(DistthinkError, match="without gates"):
        logits.sum().backward()


def test_apply_molora_errors():
    with pytest.raises(ConfigError, match="match no"):
        apply_molora(_tiny_model(), 2, r=4, target_modules=["nope"])
    with pytest.raises(ConfigError, match="output head"):
        apply_molora(_tiny_model(), 2, r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="needs target_modules"):
        apply_molora(_tiny_model(), 2, r=4)
    with pytest.raises(DistthinkError, match="no MoLoRA layers"):
        set_gates(_tiny_model(), torch.rand(1, 3))
    model = apply_molora(_tiny_model(), 2, r=4, target_modules=["q_proj"])
    clear_gates(model)
    with pytest.raises(DistthinkError, match="without gates"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_fresh_init_is_independent_of_the_global_rng():
    """Every rank must build the same adapters (ZeRO-3 partitions each rank's local copy)."""
    torch.manual_seed(1)
    a = apply_molora(_tiny_model(), 2, r=4, target_modules=["q_proj"], seed=7)
    torch.manual_seed(2)
    torch.rand(10)
    b = apply_molora(_tiny_model(), 2, r=4, target_modules=["q_proj"], seed=7)
    for n, la in molora_layers(a).items():
        lb = molora_layers(b)[n]
        assert torch.equal(la.lora_A, lb.lora_A) and torch.count_nonzero(la.lora_B) == 0
    r = la.r
    assert not torch.equal(la.lora_A[:r], la.lora_A[r:2 * r])  # adapters are drawn independently
