"""CF encoders learn on the synthetic data, LightGCN export is the propagated table, exports round-trip."""

import json

import pandas as pd
import pytest
import torch
from _tolerance import fp_tol

from distthink.errors import CheckpointError, ConfigError
from distthink.tasks.thinkrec.cf import (
    CFConfig,
    LightGCN,
    export_cf,
    last_train_history,
    load_cf_export,
    load_split,
    normalized_adjacency,
    predict,
    train_cf,
)
from distthink.tasks.thinkrec.metrics import auc
from distthink.tasks.thinkrec.prepare import prepare
from distthink.tasks.thinkrec.synthetic_world import generate


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    prepare(generate(120, 80, seed=0).interactions, out, history_len=10)
    n_items = len(pd.read_parquet(out / "items.parquet"))
    n_users = len(pd.read_parquet(out / "users.parquet"))
    splits = {s: load_split(out / f"{s}.parquet", n_items, 10) for s in ("train", "valid", "test")}
    return out, n_users, n_items, splits


@pytest.mark.parametrize("model", ["mf", "lightgcn", "sasrec", "dcn", "din"])
def test_model_beats_random_and_export_roundtrips(prepared, tmp_path, model):
    out, n_users, n_items, s = prepared
    torch.set_num_threads(1)
    res = train_cf(s["train"], s["valid"], n_users, n_items,
                   CFConfig(model=model, dim=16, max_epochs=15, progress=False))
    y = s["test"].label.numpy().astype(int)
    test_auc = auc(y, predict(res.model, s["test"]).numpy())
    # ~490 test rows: the AUC standard error is ~0.025, so 0.62 is > 4 sigma above random (measured: mf 0.76,
    # lightgcn 0.81, sasrec 0.70, dcn 0.70, din 0.70)
    assert test_auc > 0.62, (model, test_auc)
    assert res.valid_auc == max(h["valid_auc"] for h in res.history)  # best epoch kept

    exp_dir = export_cf(res, tmp_path / model, out, {"test_auc": test_auc})
    e = load_cf_export(exp_dir)
    assert e.user.shape == (n_users, 16) and e.item.shape == (n_items, 16)
    assert e.meta["model"] == model and e.meta["test_auc"] == test_auc
    assert e.users["raw_user_id"].tolist() == pd.read_parquet(out / "users.parquet")["raw_user_id"].tolist()
    # every export scores the rows as the trained model does (tables, or the encoder on each row)
    torch.testing.assert_close(e.score_split(s["test"]), predict(res.model, s["test"]))
    assert e.user_vector == {"mf": "table", "lightgcn": "table", "sasrec": "history"}.get(model, "target_aware")
    if model in ("mf", "lightgcn"):
        # the exported tables reproduce the model's scores exactly (LightGCN: already propagated): same op on the
        # same values, bit-identical (assert_close's default fp32 tolerance is not needed)
        torch.testing.assert_close(e.score(s["test"].user, s["test"].item), predict(res.model, s["test"]))
    elif model == "sasrec":
        enc = e.load_sasrec()
        torch.testing.assert_close(predict(enc, s["test"]), predict(res.model, s["test"]))  # same model, same ops
        hist = last_train_history(s["train"], n_users, 10)
        users = enc.encode(hist.hist_items, hist.hist_labels, hist.hist_mask)
        # the export encoded other batches: fp32 through 2 pre-norm blocks (~8 chained reductions of length <= 32
        # each) and the final LayerNorm
        torch.testing.assert_close(e.user[hist.user], users, rtol=0,
                                   atol=fp_tol(torch.float32, users.abs().max(), k=17 * 32))


def test_lightgcn_export_is_propagated_table(prepared):
    out, n_users, n_items, s = prepared
    tr = s["train"]
    m = LightGCN(n_users, n_items, dim=8, layers=2)
    pos = tr.label > 0.5
    m.adjacency = normalized_adjacency(tr.user[pos], tr.item[pos], n_users, n_items)
    # dense reference: A_hat = D^-1/2 A D^-1/2, E_final = (E + A E + A^2 E) / 3
    n = n_users + n_items
    a = torch.zeros(n, n)
    a[tr.user[pos], tr.item[pos] + n_users] = 1
    a[tr.item[pos] + n_users, tr.user[pos]] = 1
    deg = a.sum(1)
    dinv = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    ahat = dinv[:, None] * a * dinv[None, :]
    e0 = m.embedding.weight.detach()

    def propagate(x, absolute=False):
        """float64 dense reference; absolute=True gives sum|terms| (A_hat >= 0), the scale of fp32 rounding."""
        a64, x64 = ahat.double(), (x.abs() if absolute else x).double()
        return (x64 + a64 @ x64 + a64 @ a64 @ x64) / 3

    u, i = m.tables()
    # fp32 sparse propagation: two chained sums over a row's neighbours (< n), scaled by sum|terms|
    tol = fp_tol(torch.float32, propagate(e0, absolute=True).max(), k=2 * n)
    torch.testing.assert_close(torch.cat([u, i]).detach().double(), propagate(e0), atol=tol, rtol=0)
    # the custom symmetric backward gives the dense reference gradient (A_hat is symmetric: the same propagation)
    w = torch.randn(n, 8)
    (torch.cat([u, i]) * w).sum().backward()
    tol = fp_tol(torch.float32, propagate(w, absolute=True).max(), k=2 * n)
    torch.testing.assert_close(m.embedding.weight.grad.double(), propagate(w), atol=tol, rtol=0)


def test_config_and_export_errors(prepared, tmp_path):
    _, n_users, n_items, s = prepared
    with pytest.raises(ConfigError, match="unknown CF model"):
        train_cf(s["train"], s["valid"], n_users, n_items, CFConfig(model="bpr"))
    with pytest.raises(CheckpointError, match="missing"):
        load_cf_export(tmp_path)
    res = train_cf(s["train"], s["valid"], n_users, n_items, CFConfig(model="mf", dim=4, max_epochs=1, progress=False))
    d = export_cf(res, tmp_path / "e", prepared[0])
    meta = json.loads((d / "cf_meta.json").read_text())
    meta["n_users"] += 1
    (d / "cf_meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="disagree"):
        load_cf_export(d)


def _din_by_hand(m, user, item, hist, labels, mask):
    """DIN's user vector for one row, in float64 with explicit loops: attention weight a_j = MLP([h, t, h-t, h*t])
    per real history item (no softmax), interest = sum_j a_j h_j, u = out([user emb, interest])."""
    W = {k: v.double() for k, v in m.state_dict().items()}
    t = W["item.weight"][item]
    interest = torch.zeros_like(t)
    for j in range(len(hist)):
        if not mask[j]:
            continue
        h = W["item.weight"][hist[j]] + W["label.weight"][labels[j]]
        z = torch.cat([h, t, h - t, h * t])
        a = W["attention.2.weight"] @ torch.relu(W["attention.0.weight"] @ z + W["attention.0.bias"]) + \
            W["attention.2.bias"]
        interest += a * h
    return W["out.1.weight"] @ torch.cat([W["user.weight"][user], interest]) + W["out.1.bias"]


def _dcn_by_hand(m, user, item, hist, labels, mask):
    """DCN's user vector for one row, float64: x0 = [user, target, mean history], cross x_{l+1} = x0 * (W x_l + b)
    + x_l, deep MLP on x0, u = out([x_L, deep])."""
    W = {k: v.double() for k, v in m.state_dict().items()}
    hs = [W["item.weight"][hist[j]] + W["label.weight"][labels[j]] for j in range(len(hist)) if mask[j]]
    pooled = torch.stack(hs).mean(0) if hs else torch.zeros(W["user.weight"].shape[1], dtype=torch.float64)
    x0 = torch.cat([W["user.weight"][user], W["item.weight"][item], pooled])
    x = x0
    for i in range(len(m.cross)):
        x = x0 * (W[f"cross.{i}.weight"] @ x + W[f"cross.{i}.bias"]) + x
    deep = torch.relu(W["deep.3.weight"] @ torch.relu(W["deep.0.weight"] @ x0 + W["deep.0.bias"]) + W["deep.3.bias"])
    return W["out.weight"] @ torch.cat([x, deep]) + W["out.bias"]


@pytest.mark.parametrize("model,by_hand", [("din", _din_by_hand), ("dcn", _dcn_by_hand)])
def test_target_aware_user_vectors_equal_a_per_row_reference(prepared, model, by_hand):
    """DCN / DIN user vectors against naive per-row float64 references; they depend on the target (same user and
    history, another item: another vector) and ignore padded history slots."""
    from distthink.tasks.thinkrec.cf import build_model

    _, n_users, n_items, s = prepared
    torch.manual_seed(0)
    m = build_model(CFConfig(model=model, dim=8, history_len=10), n_users, n_items).eval()
    with torch.no_grad():  # non-trivial biases so a dropped term shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    n_hist = s["train"].hist_mask.sum(1)
    b = s["train"].take(torch.cat([torch.nonzero((n_hist > 0) & (n_hist < 10))[:10, 0],
                                   torch.nonzero(n_hist == 10)[:1, 0], torch.nonzero(n_hist == 0)[:1, 0]]))
    got = m.encode_user(b.user, b.item, b.hist_items, b.hist_labels, b.hist_mask).detach().double()
    for r in range(12):
        want = by_hand(m, b.user[r], b.item[r], b.hist_items[r], b.hist_labels[r], b.hist_mask[r])
        # fp32 forward vs float64 reference: a few hundred ulps of the vector's size
        torch.testing.assert_close(got[r], want, atol=2e-5 * max(1.0, want.abs().max().item()), rtol=0)
    other = (b.item + 1) % n_items
    moved = m.encode_user(b.user, other, b.hist_items, b.hist_labels, b.hist_mask)
    # every row with a history moved with its target (DIN reads the target only through the history attention)
    assert (moved - got.float()).abs().amax(1)[b.hist_mask.any(1)].min() > 1e-4
    padded = b.hist_items.clone()
    padded[~b.hist_mask] = (padded[~b.hist_mask] * 0 + 3)  # padding slots now name a real item: must not matter
    assert (~b.hist_mask).any()
    torch.testing.assert_close(m.encode_user(b.user, b.item, padded, b.hist_labels, b.hist_mask), got.float())
