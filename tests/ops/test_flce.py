"""Exactness of `fused_linear_cross_entropy` against the naive reference (materialised logits + autograd)."""

import math

import pytest
import torch
from _tolerance import eps, fp_tol
from references.flce import naive_fused_linear_cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode

from distthink.errors import ConfigError, DataError, DistthinkError
from distthink.ops import auto_chunk_size, fused_linear_cross_entropy, gathered_lm_head

# fp32, relative to the largest magnitude of the compared tensor: the longest reduction of these cases is over the
# 512-word vocabulary (lse, grad_hidden); the tokens (<= 60, grad_weight) and h (<= 64, logits) are shorter
RTOL = fp_tol(torch.float32, 1.0, k=512)
# bf16 logits GEMMs, fp32 softmax/CE: the loss averages N = 64 tokens' independent bf16 roundings of their logits
# (<= eps/2 * |z| each, |z| ~ CE), i.e. ~eps/sqrt(N) relative (measured 5e-5); a gradient is returned in bf16 and its
# GEMM inputs are bf16-rounded: ~2 roundings of eps/2 of the largest element, 2.5 eps (measured 0.7 eps). bf16
# roundings hardly depend on the CPU (the fp32 accumulation order is far below them).
BF16_LOSS_RTOL = eps(torch.bfloat16) / math.sqrt(64)
BF16_GRAD_RTOL = 2.5 * eps(torch.bfloat16)


def close(a, b, rtol=RTOL):
    a, b = a.detach().double(), b.detach().double()
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rtol * scale + 1e-12, f"max abs err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def make(n=53, h=32, v=512, seed=0, bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, target, g


def grads_of(loss, inputs, grad_output=None):
    inputs = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, inputs, grad_output, allow_unused=True)


def compare(hidden, weight, bias, target, grad_output=None, rtol=RTOL, **kw):
    loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend", "strategy")}
    ref, _ = naive_fused_linear_cross_entropy(hidden, weight, target, bias=bias, **ref_kw)
    close(loss, ref, rtol)
    if grad_output is None and kw.get("reduction", "sum") == "none":
        grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7))
    got = grads_of(loss, (hidden, weight, bias), grad_output)
    want = grads_of(ref, (hidden, weight, bias), grad_output)
    for a, b in zip(got, want):
        close(a, b, rtol)
    return loss, ref


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_random_weights_match_naive(bias, reduction, chunk_size):
    hidden, weight, b, target, g = make(bias=bias)
    target[5:11] = -100
    w = torch.rand(target.shape, generator=g) * 2
    w[20] = 0.0
    compare(hidden, weight, b, target, token_weights=w, normalizer=17.5, reduction=reduction,
            chunk_size=chunk_size)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("tile", [None, 7, 100])
def test_vocab_strategy_matches_naive(bias, reduction, tile):
    """strategy='vocab': two passes over vocabulary tiles (chunk_size = columns per tile)."""
    hidden, weight, b, target, g = make(bias=bias)
    target[5:11] = -100
    w = torch.rand(target.shape, generator=g) * 2
    w[20] = 0.0
    compare(hidden, weight, b, target, token_weights=w, normalizer=17.5, reduction=reduction,
            chunk_size=tile, strategy="vocab")


def test_vocab_strategy_bf16_zero_weights_and_frozen_weight():
    hidden, weight, _, target, g = make(n=64, h=64, v=2048, dtype=torch.bfloat16)
    w = torch.rand(64, generator=g)
    loss = fused_linear_cross_entropy(hidden, weight, target, token_weights=w, normalizer=10.0, strategy="vocab",
                                      chunk_size=300)
    truth, _ = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=w, normalizer=10.0,
                                                upcast=True)
    close(loss, truth, BF16_LOSS_RTOL)
    for a, b in zip(grads_of(loss, (hidden, weight)), grads_of(truth, (hidden, weight))):
        assert a.dtype == torch.bfloat16
        close(a, b, BF16_GRAD_RTOL)
    hidden, weight, _, target, _ = make(n=16)
    loss = fused_linear_cross_entropy(hidden, weight, target, token_weights=torch.zeros(16), strategy="vocab")
    gh, gw = grads_of(loss, (hidden, weight))
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0
    frozen = weight.detach()
    loss = fused_linear_cross_entropy(hidden, frozen, target, strategy="vocab", chunk_size=64)
    ref, _ = naive_fused_linear_cross_entropy(hidden, frozen, target)
    close(grads_of(loss, (hidden,))[0], grads_of(ref, (hidden,))[0])


def test_auto_strategy_choice():
    hidden, weight, _, target, _ = make(n=200, v=512)
    pick = lambda **kw: fused_linear_cross_entropy(hidden, weight, target, return_stats=True, **kw)[1].strategy
    assert pick() == "rows"
    assert pick(strategy="vocab") == "vocab"
    with pytest.raises(ConfigError, match="strategy"):
        pick(strategy="diagonal")


@pytest.mark.parametrize("normalizer", [None, 3.0, torch.tensor(41.25)])
def test_normalizer_float_tensor_none_and_grad_output_scale(normalizer):
    hidden, weight, _, target, _ = make(n=20)
    compare(hidden, weight, None, target, grad_output=torch.tensor(0.37), normalizer=normalizer, chunk_size=6)


def test_zero_weights_give_zero_loss_and_grads():
    hidden, weight, _, target, _ = make(n=16)
    loss = fused_linear_cross_entropy(hidden, weight, target, token_weights=torch.zeros(16), chunk_size=4)
    gh, gw = grads_of(loss, (hidden, weight))
    assert loss.item() == 0.0 and gh.abs().max() == 0 and gw.abs().max() == 0
    compare(hidden, weight, None, target, token_weights=torch.zeros(16), chunk_size=4)


def test_all_ignored_chunks_and_all_ignored_input():
    hidden, weight, _, target, _ = make(n=40)
    target[8:32] = -100  # three whole chunks of 8 ignored
    loss, _ = compare(hidden, weight, None, target, chunk_size=8)
    gh = grads_of(fused_linear_cross_entropy(hidden, weight, target, chunk_size=8), (hidden,))[0]
    assert gh[8:32].abs().max() == 0 and gh[:8].abs().max() > 0
    target[:] = -100
    for red in ("sum", "none"):
        loss = fused_linear_cross_entropy(hidden, weight, target, reduction=red)
        assert float(loss.detach().abs().sum()) == 0.0
        gh, gw = grads_of(loss.sum(), (hidden, weight))
        assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_one_token():
    hidden, weight, b, target, _ = make(n=1, bias=True)
    compare(hidden, weight, b, target, token_weights=torch.tensor([0.3]), normalizer=2.0)


def test_custom_ignore_index_and_3d_input():
    hidden, weight, _, target, g = make(n=24)
    target[3] = 5  # an ignore_index that is a real id elsewhere must still be skipped
    h3, t3 = hidden.view(2, 12, -1), target.view(2, 12)
    w3 = torch.rand(2, 12, generator=g)
    loss = fused_linear_cross_entropy(h3, weight, t3, token_weights=w3, ignore_index=5, chunk_size=5)
    ref, _ = naive_fused_linear_cross_entropy(h3, weight, t3, token_weights=w3, ignore_index=5)
    close(loss, ref)
    for a, b in zip(grads_of(loss, (hidden, weight)), grads_of(ref, (hidden, weight))):
        close(a, b)
    none = fused_linear_cross_entropy(h3, weight, t3, token_weights=w3, ignore_index=5, reduction="none")
    assert none.shape == (2, 12) and float(none.detach().view(-1)[target == 5].abs().sum()) == 0.0


def test_frozen_weight_and_no_grad():
    hidden, weight, _, target, _ = make(n=30)
    frozen = weight.detach()
    loss = fused_linear_cross_entropy(hidden, frozen, target, chunk_size=8)
    ref, _ = naive_fused_linear_cross_entropy(hidden, frozen, target)
    close(grads_of(loss, (hidden,))[0], grads_of(ref, (hidden,))[0])
    with torch.no_grad():
        close(fused_linear_cross_entropy(hidden, weight, target, chunk_size=8), ref)


def test_tied_embeddings_get_both_gradients():
    torch.manual_seed(3)
    v, h, n = 256, 32, 21
    emb = torch.nn.Embedding(v, h)
    proj = torch.nn.Linear(h, h)
    ids = torch.randint(0, v, (n,))
    target = torch.roll(ids, -1)
    target[-1] = -100

    def run(op):
        emb.zero_grad(), proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))
        if op == "fused":
            loss = fused_linear_cross_entropy(hidden, emb.weight, target, chunk_size=5)
        else:
            loss, _ = naive_fused_linear_cross_entropy(hidden, emb.weight, target)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()

    fused, naive = run("fused"), run("naive")
    for a, b in zip(fused, naive):
        close(a, b)
    # the embedding-lookup part of the tied gradient is really there (rows of the input ids)
    head_only = torch.autograd.grad(
        fused_linear_cross_entropy(torch.tanh(proj(emb(ids))).detach(), emb.weight, target), emb.weight)[0]
    assert (fused[1] - head_only)[ids].abs().max() > 0


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_stats_count_accuracy_and_selected_logits_with_gradients(strategy):
    hidden, weight, b, target, g = make(n=40, bias=True)
    target[:6] = -100
    w = torch.rand(40, generator=g)
    w[6] = 0.0
    with torch.no_grad():
        logits = hidden @ weight.t() + b
    target[10:20] = logits[10:20].argmax(-1)  # make some predictions right
    rows, ids = [12, 0, 39], [7, 100, 3, 7]
    loss, stats = fused_linear_cross_entropy(hidden, weight, target, bias=b, token_weights=w, normalizer=9.0,
                                             return_stats=True, stats_token_ids=ids, stats_rows=rows,
                                             chunk_size=9, strategy=strategy)
    learned = (target != -100) & (w > 0)
    assert stats.num_learned == int(learned.sum()) == 33
    want_correct = int(((logits.argmax(-1) == target) & learned).sum())
    assert int(stats.num_correct) == want_correct >= 10
    assert math.isclose(float(stats.accuracy), want_correct / 33, rel_tol=eps())  # one fp32 division of counts
    # two fp32 sums of 40 positive terms (one of w / 9 * 9): no cancellation, relative fp_tol
    assert math.isclose(float(stats.weight_sum), float((w * learned).sum()), rel_tol=fp_tol(torch.float32, 1.0, k=40))
    sel = stats.selected_logits
    assert sel.shape == (3, 4) and sel.dtype == torch.float32
    close(sel, logits[rows][:, ids])
    # a BCE on the selected logits backprops into hidden, weight and bias together with the LM loss
    yes = torch.tensor([1.0, 0.0, 1.0])
    total = loss + torch.nn.functional.binary_cross_entropy_with_logits(sel[:, 0], yes)
    ref, _ = naive_fused_linear_cross_entropy(hidden, weight, target, bias=b, token_weights=w, normalizer=9.0)
    ref_logits = hidden @ weight.t() + b
    ref_total = ref + torch.nn.functional.binary_cross_entropy_with_logits(ref_logits[rows, 7], yes)
    for a, c in zip(grads_of(total, (hidden, weight, b)), grads_of(ref_total, (hidden, weight, b))):
        close(a, c)


def test_bf16_on_cpu_within_documented_tolerance():
    """bf16: logits GEMMs in bf16, softmax/CE/grad_weight accumulation in fp32. Compared with the fp32
    computation on the same bf16-rounded inputs: loss within BF16_LOSS_RTOL (~1e-3) relative, gradients within
    BF16_GRAD_RTOL (~2e-2) of their max magnitude, and never much worse than the naive bf16 implementation."""
    hidden, weight, _, target, g = make(n=64, h=64, v=2048, dtype=torch.bfloat16)
    w = torch.rand(64, generator=g)
    loss = fused_linear_cross_entropy(hidden, weight, target, token_weights=w, normalizer=10.0, chunk_size=16)
    truth, _ = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=w, normalizer=10.0,
                                                upcast=True)
    naive, _ = naive_fused_linear_cross_entropy(hidden, weight, target, token_weights=w, normalizer=10.0)
    close(loss, truth, BF16_LOSS_RTOL)
    got, want, nb = (grads_of(x, (hidden, weight)) for x in (loss, truth, naive))
    for a, b, c in zip(got, want, nb):
        assert a.dtype == torch.bfloat16
        close(a, b, BF16_GRAD_RTOL)
        err_ours = (a.double() - b.double()).abs().max()
        err_naive = (c.double() - b.double()).abs().max()
        assert err_ours <= 2 * err_naive + 1e-6  # a ratio of two bf16 errors; 1e-6 only covers err_naive == 0


class LargestNewTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any op returns; skip_views=True leaves out outputs that share an
    input's storage (views and in-place results), i.e. counts only fresh allocations."""

    def __init__(self, skip_views: bool = False):
        super().__init__()
        self.skip_views, self.biggest = skip_views, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a)} if self.skip_views else set()
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                self.biggest = max(self.biggest, t.numel())
        return out


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_never_materialises_n_by_v(strategy):
    """The largest tensor any op allocates is a chunk, not N x V (checked with a dispatch mode)."""
    n, v = 1024, 4096
    hidden, weight, _, target, _ = make(n=n, h=16, v=v)
    with LargestNewTensor() as largest:
        loss = fused_linear_cross_entropy(hidden, weight, target, strategy=strategy)
        loss.backward()
    # default: at most an eighth of the rows per chunk / of the vocabulary per tile
    assert n * v // 16 < largest.biggest <= n * v // 8 + 1


def test_auto_chunk_size_policy():
    v = 151936
    assert auto_chunk_size(8192, v, torch.float32, budget_mb=1024) == 1024  # an eighth of the rows
    assert auto_chunk_size(8192, v, torch.float32, budget_mb=256) == 432  # 441 rows fit 256 MiB; 19 balanced chunks
    assert auto_chunk_size(1000, v, torch.float32) == 125
    assert auto_chunk_size(100, v, torch.float32) == 50  # not below 64 rows, then balanced: 2 x 50
    assert auto_chunk_size(60, v, torch.float32) == 60
    # bf16 torch path: fp32 work + bf16 logits per row; liger: bf16 logits only
    assert auto_chunk_size(8192, v, torch.bfloat16, budget_mb=512) == math.ceil(8192 / math.ceil(8192 / 588))
    assert auto_chunk_size(8192, v, torch.bfloat16, backend="liger", budget_mb=512) == 1024
    assert auto_chunk_size(8192, v, torch.bfloat16, backend="liger", budget_mb=256) == 8192 // 10 + 1


def test_input_errors_are_clear():
    hidden, weight, _, target, _ = make(n=10)
    with pytest.raises(DataError, match="negative or not finite"):
        fused_linear_cross_entropy(hidden, weight, target, token_weights=-torch.ones(10))
    bad = target.clone()
    bad[4] = 10_000
    with pytest.raises(DataError, match="outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ConfigError, match="segment_ids or position_ids"):
        fused_linear_cross_entropy(hidden, weight, target, dynamic="argmax", think_end_id=3)
    with pytest.raises(ConfigError, match="think_end_id"):
        fused_linear_cross_entropy(hidden, weight, target, dynamic="soft", position_ids=torch.arange(10))
    with pytest.raises(ConfigError, match="dtype|cast"):
        fused_linear_cross_entropy(hidden.double(), weight, target)
    with pytest.raises(ConfigError, match="normalizer"):
        fused_linear_cross_entropy(hidden, weight, target, normalizer=0.0)
    with pytest.raises(ConfigError, match="CUDA"):
        fused_linear_cross_entropy(hidden, weight, target, backend="liger")


def test_second_backward_is_refused():
    hidden, weight, _, target, _ = make(n=10)
    loss = fused_linear_cross_entropy(hidden, weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(DistthinkError, match="backward ran twice"):
        loss.backward()


def test_gathered_lm_head_is_a_noop_without_zero3():
    weight = torch.nn.Parameter(torch.randn(8, 4))
    with gathered_lm_head(weight) as w:
        assert w is weight


def test_autocast_does_not_change_the_computation():
    """Inside a bf16 autocast region the op still computes in its inputs' dtype (fp32 here)."""
    hidden, weight, _, target, _ = make(n=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=8)
    ref, _ = naive_fused_linear_cross_entropy(hidden, weight, target)
    close(loss, ref)
    for a, b in zip(grads_of(loss, (hidden, weight)), grads_of(ref, (hidden, weight))):
        close(a, b)


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_no_grad_does_no_gradient_work(strategy):
    """Under torch.no_grad() (evaluation) only the logits GEMM runs: no (V, H) gradient is allocated."""
    hidden, weight, _, target, _ = make(n=8, h=64, v=4096)
    with torch.no_grad(), LargestNewTensor(skip_views=True) as largest:
        loss = fused_linear_cross_entropy(hidden, weight, target, strategy=strategy)
    assert largest.biggest < weight.numel()
    close(loss, naive_fused_linear_cross_entropy(hidden, weight, target)[0], fp_tol(torch.float32, 1.0, k=4096))  # V
