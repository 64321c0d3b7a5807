"""Collaborative-filtering encoders for ThinkRec: MF, LightGCN, SASRec, DCN, DIN; training and export.

All five score a (user, item) pair as a dot product ``<user_vector, item_vector>`` and are trained
pointwise with BCE on the binarised labels of a prepared train split, with early stopping on the
validation AUC (the best epoch's weights are kept). What each "user vector" is:

- ``mf``: a free embedding per user.
- ``lightgcn``: the mean over layers 0..L of the embeddings propagated on the normalised user-item
  graph of the *positive train* interactions, A_hat = D^-1/2 A D^-1/2 (He et al., 2020).
  Propagation runs every training step (full graph, one sparse matmul per layer) and **once at
  export**: the exported tables are the propagated ones, so the LLM step only looks rows up.
- ``sasrec``: a small Transformer over the user's history (item + liked/disliked + recency position
  embeddings, a learned [CLS] slot at position 0 whose output is the user vector; padding masked).
  The exported user table encodes each user's last ``history_len`` *train* interactions; the full
  weights are exported too: injection encodes each row's own history (`user_vector: history`).
- ``dcn`` and ``din`` are *target-aware* (`user_vector: target_aware`): the user vector of a row is
  ``encode_user(user, target item, last history_len history items)``, so the same user gets another vector for
  another target. DCN: a cross network (DCN-v2 form, ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``) and a parallel MLP
  over ``[user embedding, target embedding, mean of the history item embeddings]``, mapped to d. DIN: an attention
  unit scores each history item against the target (MLP on ``[h, t, h - t, h * t]``), the weighted sum of the
  history (unnormalised, as DIN) is joined with the user embedding and mapped to d. History items carry a
  liked/disliked embedding (as SASRec). The exported ``user`` table is the user-id embedding (what `rec group`
  clusters and the gate compares); the per-row vectors come from the exported weights.

Export folder (`export_cf` / `load_cf_export`):

- ``embeddings.safetensors``: ``user`` (n_users, dim) float32, ``item`` (n_items, dim) float32,
  rows indexed by the contiguous ids of the prepared data.
- ``users.parquet`` / ``items.parquet``: the id maps copied from the prepared folder.
- ``cf_meta.json``: model, dim, n_users, n_items, score="dot", propagated (bool), best_epoch,
  valid_auc, test_auc, test_uauc, train config, prepared_dir.
- ``<model>.safetensors`` (SASRec, DCN, DIN): the encoder weights; the config is in cf_meta.json, and
  ``user_vector`` (``table`` | ``history`` | ``target_aware``) says whether injection looks the user row up or
  encodes it per row (`CFExport.row_user_vectors`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from distthink.errors import CheckpointError, ConfigError, DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec.metrics import auc
from distthink.tasks.thinkrec.prepare import read_split

log = get_logger(__name__)
MODELS = ("mf", "lightgcn", "sasrec", "dcn", "din")
_DEFAULT_LR = {"mf": 5e-2, "lightgcn": 5e-2, "sasrec": 3e-3, "dcn": 3e-3, "din": 3e-3}
#: how injection gets a row's user vector: a table row, the row's history encoded, or (user, target, history)
USER_VECTOR = {"mf": "table", "lightgcn": "table", "sasrec": "history", "dcn": "target_aware", "din": "target_aware"}
#: models whose exported weights encode rows (file <model>.safetensors)
ENCODERS = ("sasrec", "dcn", "din")


# ----------------------------------------------------------------------------------------------------
# data


@dataclass
class CFSplit:
    """One prepared split as tensors. n rows, K = history_len.

    user, item: (n,) long; label: (n,) float32;
    hist_items: (n, K) long, right-aligned (most recent in column K-1), padding = n_items;
    hist_labels: (n, K) long, 0 on padding; hist_mask: (n, K) bool, True on real entries.
    """

    user: torch.Tensor
    item: torch.Tensor
    label: torch.Tensor
    hist_items: torch.Tensor
    hist_labels: torch.Tensor
    hist_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.user.numel())

    def to(self, device) -> "CFSplit":
        return CFSplit(*(getattr(self, f).to(device) for f in ("user", "item", "label", "hist_items",
                                                                "hist_labels", "hist_mask")))

    def take(self, idx: torch.Tensor) -> "CFSplit":
        return CFSplit(*(getattr(self, f)[idx] for f in ("user", "item", "label", "hist_items",
                                                          "hist_labels", "hist_mask")))


def _right_align(lists: pd.Series, k: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """list column -> (n, k) right-aligned matrix keeping the last k entries, and its mask."""
    lens = np.fromiter((min(len(x), k) for x in lists), dtype=np.int64, count=len(lists))
    out = np.full((len(lists), k), pad, dtype=np.int64)
    mask = np.arange(k)[None, :] >= (k - lens)[:, None]
    flat = np.concatenate([np.asarray(x[len(x) - m:], dtype=np.int64) for x, m in zip(lists, lens)]) \
        if lens.sum() else np.zeros(0, dtype=np.int64)
    out[mask] = flat
    return out, mask


def load_split(path: str | Path, n_items: int, history_len: int = 10) -> CFSplit:
    """Read a prepared split file into a `CFSplit` (ids must be below the prepared n_users/n_items)."""
    return split_from_frame(read_split(path), n_items, history_len, source=str(path))


def split_from_frame(df: pd.DataFrame, n_items: int, history_len: int = 10, source: str | None = None) -> CFSplit:
    """Rows of a prepared split (DataFrame) -> `CFSplit`: the last `history_len` history items, right-aligned."""
    for col in ("user_id", "item_id", "label", "history_item_ids", "history_labels"):
        if col not in df.columns:
            raise DataError("missing column", source=source, field=col,
                            fix="use a split written by `distthink rec prepare`", reason="missing_field")
    hist, mask = _right_align(df["history_item_ids"], history_len, n_items)
    hlab, _ = _right_align(df["history_labels"], history_len, 0)
    item = df["item_id"].to_numpy(dtype=np.int64)
    if len(item) and (item.max() >= n_items or item.min() < 0):
        raise DataError(f"item_id out of range 0..{n_items - 1}", source=source, field="item_id",
                        fix="the split and items.parquet must come from the same prepare run", reason="bad_value")
    return CFSplit(torch.tensor(df["user_id"].to_numpy(dtype=np.int64)), torch.tensor(item),
                   torch.tensor(df["label"].to_numpy(dtype=np.float32)), torch.from_numpy(hist),
                   torch.from_numpy(hlab), torch.from_numpy(mask))


# ----------------------------------------------------------------------------------------------------
# models


class MF(nn.Module):
    """Matrix factorisation: score = <P[u], Q[i]>."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user (n_users, d), item (n_items, d)) as used for scoring."""
        return self.user.weight, self.item.weight

    def forward(self, batch: CFSplit) -> torch.Tensor:
        """(n,) logits."""
        return (self.user(batch.user) * self.item(batch.item)).sum(-1)

    def l2(self, batch: CFSplit) -> torch.Tensor:
        """Mean squared norm of the batch's rows (L2 on touched rows only, see train_cf)."""
        return (self.user(batch.user).pow(2).sum(-1) + self.item(batch.item).pow(2).sum(-1)).mean()


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """Sparse (U+I, U+I) D^-1/2 A D^-1/2 of the bipartite graph with edges (users[e], items[e]).

    Duplicate edges count once; isolated nodes get zero rows (no division by zero).
    """
    n = n_users + n_items
    pairs = torch.unique(torch.stack([users, items]), dim=1)
    src = torch.cat([pairs[0], pairs[1] + n_users])
    dst = torch.cat([pairs[1] + n_users, pairs[0]])
    deg = torch.bincount(src, minlength=n).float()
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    vals = inv_sqrt[src] * inv_sqrt[dst]
    coo = torch.sparse_coo_tensor(torch.stack([src, dst]), vals, (n, n), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is what we need
        warnings.simplefilter("ignore")
        return coo.to_sparse_csr()


class _SymmetricSpmm(torch.autograd.Function):
    """y = A @ x for a *symmetric* sparse A; the backward is A @ grad (A^T = A).

    Autograd's own backward of sparse @ dense transposes A on every call, which is ~10x slower on CPU
    than reusing the CSR matrix (measured 0.48 s vs 0.05 s per 2-layer step at MovieLens-1M size).
    """

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adjacency @ grad


class LightGCN(nn.Module):
    """LightGCN: layer-mean of embeddings propagated on the normalised positive-interaction graph."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, layers: int = 2,
                 adjacency: torch.Tensor | None = None):
        super().__init__()
        self.n_users, self.n_items, self.layers = n_users, n_items, layers
        self.embedding = nn.Embedding(n_users + n_items, dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.adjacency = adjacency  # set by train_cf from the train split; not a parameter

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Propagated (user (n_users, d), item (n_items, d)): mean over layers 0..L."""
        if self.adjacency is None:
            raise ConfigError("LightGCN needs its adjacency (built from the train split) before use")
        e = self.embedding.weight
        acc = e
        for _ in range(self.layers):
            e = _SymmetricSpmm.apply(self.adjacency, e)
            acc = acc + e
        acc = acc / (self.layers + 1)
        return acc[: self.n_users], acc[self.n_users:]

    def forward(self, batch: CFSplit) -> torch.Tensor:
        u, i = self.tables()
        return (u[batch.user] * i[batch.item]).sum(-1)

    def l2(self, batch: CFSplit) -> torch.Tensor:
        """Mean squared norm of the batch's layer-0 (ego) rows, as in the LightGCN paper."""
        e = self.embedding.weight
        return (e[batch.user].pow(2).sum(-1) + e[batch.item + self.n_users].pow(2).sum(-1)).mean()


class SASRec(nn.Module):
    """Self-attentive history encoder; user vector = output at a learned [CLS] slot (position 0)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, history_len: int = 10, layers: int = 2,
                 heads: int = 2, dropout: float = 0.1):
        super().__init__()
        self.n_users, self.n_items, self.history_len = n_users, n_items, history_len
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # last row = padding
        self.label = nn.Embedding(2, dim)
        self.pos = nn.Embedding(history_len + 1, dim)
        self.cls = nn.Parameter(torch.zeros(dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.item.weight, std=0.1)
        with torch.no_grad():
            self.item.weight[n_items].zero_()

    def encode(self, hist_items: torch.Tensor, hist_labels: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
        """(n, K) right-aligned history -> (n, d) user vectors. Empty histories give the [CLS] output."""
        n, k = hist_items.shape
        x = self.item(hist_items) + self.label(hist_labels.clamp(0, 1)) + self.pos.weight[1:k + 1][None]
        cls = (self.cls + self.pos.weight[0]).expand(n, 1, -1)
        x = torch.cat([cls, x], dim=1)
        pad = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=hist_mask.device), ~hist_mask], dim=1)
        return self.norm(self.encoder(x, src_key_padding_mask=pad)[:, 0])

    def tables(self, user_history: CFSplit | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(user (n_users, d), item (n_items, d)); user rows encode `user_history` (one row per user)."""
        items = self.item.weight[: self.n_items]
        users = torch.zeros(self.n_users, items.shape[1], device=items.device)
        if user_history is not None and len(user_history):
            users[user_history.user] = self.encode(user_history.hist_items, user_history.hist_labels,
                                                   user_history.hist_mask)
        return users, items

    def forward(self, batch: CFSplit) -> torch.Tensor:
        u = self.encode(batch.hist_items, batch.hist_labels, batch.hist_mask)
        return (u * self.item(batch.item)).sum(-1)


class _TargetAware(nn.Module):
    """Shared parts of DCN and DIN: user / item (+ padding row) / liked-disliked embeddings; score = <u(row), t>."""

    def __init__(self, n_users: int, n_items: int, dim: int, history_len: int):
        super().__init__()
        self.n_users, self.n_items, self.history_len = n_users, n_items, history_len
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # last row = padding
        self.label = nn.Embedding(2, dim)
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.1)
        nn.init.normal_(self.label.weight, std=0.1)
        with torch.no_grad():
            self.item.weight[n_items].zero_()

    def history(self, hist_items: torch.Tensor, hist_labels: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
        """(n, K, d) history item embeddings + liked/disliked embedding, zero on padding."""
        h = self.item(hist_items) + self.label(hist_labels.clamp(0, 1))
        return h * hist_mask[..., None]

    def encode_user(self, user, item, hist_items, hist_labels, hist_mask) -> torch.Tensor:
        raise NotImplementedError

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user-id embedding (n_users, d), item (n_items, d)): what `rec group` clusters / the item rows."""
        return self.user.weight, self.item.weight[: self.n_items]

    def forward(self, batch: CFSplit) -> torch.Tensor:
        u = self.encode_user(batch.user, batch.item, batch.hist_items, batch.hist_labels, batch.hist_mask)
        return (u * self.item(batch.item)).sum(-1)


class DCN(_TargetAware):
    """Deep & Cross Network (DCN-v2 cross layers + a parallel MLP) as a target-aware user encoder."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, history_len: int = 10, layers: int = 2,
                 dropout: float = 0.1):
        super().__init__(n_users, n_items, dim, history_len)
        width = 3 * dim
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.deep = nn.Sequential(nn.Linear(width, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim),
                                  nn.ReLU())
        self.out = nn.Linear(width + dim, dim)

    def encode_user(self, user, item, hist_items, hist_labels, hist_mask) -> torch.Tensor:
        """(n,) users, (n,) targets, (n, K) right-aligned history -> (n, d) target-aware user vectors."""
        h = self.history(hist_items, hist_labels, hist_mask)
        pooled = h.sum(1) / hist_mask.sum(1, keepdim=True).clamp(min=1)
        x0 = torch.cat([self.user(user), self.item(item), pooled], -1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.out(torch.cat([x, self.deep(x0)], -1))


class DIN(_TargetAware):
    """Deep Interest Network: target-attention over the history, joined with the user embedding."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, history_len: int = 10, dropout: float = 0.1):
        super().__init__(n_users, n_items, dim, history_len)
        self.attention = nn.Sequential(nn.Linear(4 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 1))
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def encode_user(self, user, item, hist_items, hist_labels, hist_mask) -> torch.Tensor:
        """(n,) users, (n,) targets, (n, K) right-aligned history -> (n, d) target-aware user vectors."""
        h = self.history(hist_items, hist_labels, hist_mask)
        t = self.item(item)[:, None].expand_as(h)
        weight = self.attention(torch.cat([h, t, h - t, h * t], -1)).squeeze(-1) * hist_mask  # DIN: no softmax
        interest = (weight[..., None] * h).sum(1)
        return self.out(torch.cat([self.user(user), interest], -1))


# ----------------------------------------------------------------------------------------------------
# training


@dataclass
class CFConfig:
    """Training settings. Defaults suit the synthetic data and MovieLens-1M on CPU."""

    model: str = "mf"
    dim: int = 64
    layers: int = 2            # LightGCN propagation layers / SASRec blocks / DCN cross layers
    heads: int = 2             # SASRec
    dropout: float = 0.1       # SASRec, DCN, DIN
    history_len: int = 10      # SASRec/DCN/DIN input length (ThinkRec: the last 10); prepare's history_len
    lr: float | None = None    # None: the model's default (mf/lightgcn 5e-2, sasrec/dcn/din 3e-3)
    weight_decay: float = 1e-2  # MF/LightGCN: L2 on the batch's rows; SASRec/DCN/DIN: AdamW decay
    device: str = "auto"        # "auto": cuda when available, else cpu
    batch_size: int = 512
    max_epochs: int = 50
    patience: int = 3          # epochs without a valid-AUC gain before stopping
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"unknown CF model {self.model!r}; use one of {list(MODELS)}")
        if self.lr is None:
            self.lr = _DEFAULT_LR[self.model]
        for name in ("dim", "batch_size", "max_epochs", "patience", "history_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cf.{name} must be >= 1, got {getattr(self, name)}")
        if self.model == "sasrec" and self.dim % self.heads:
            raise ConfigError(f"cf.dim ({self.dim}) must be divisible by cf.heads ({self.heads})")


@dataclass
class CFResult:
    model: nn.Module
    config: CFConfig
    best_epoch: int
    valid_auc: float
    history: list = field(default_factory=list)
    user_history: CFSplit | None = None  # SASRec: each user's last train history (for the user table)


def build_model(cfg: CFConfig, n_users: int, n_items: int) -> nn.Module:
    if cfg.model == "mf":
        return MF(n_users, n_items, cfg.dim)
    if cfg.model == "lightgcn":
        return LightGCN(n_users, n_items, cfg.dim, cfg.layers)
    if cfg.model == "dcn":
        return DCN(n_users, n_items, cfg.dim, cfg.history_len, cfg.layers, cfg.dropout)
    if cfg.model == "din":
        return DIN(n_users, n_items, cfg.dim, cfg.history_len, cfg.dropout)
    return SASRec(n_users, n_items, cfg.dim, cfg.history_len, cfg.layers, cfg.heads, cfg.dropout)


@torch.no_grad()
def predict(model: nn.Module, split: CFSplit, batch_size: int = 8192) -> torch.Tensor:
    """(n,) logits for every row of `split`, eval mode, no grad."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    split = split.to(dev)
    if isinstance(model, LightGCN):  # propagate once, not per batch
        u, i = model.tables()
        out = (u[split.user] * i[split.item]).sum(-1)
    else:
        out = torch.cat([model(split.take(torch.arange(s, min(s + batch_size, len(split)), device=dev)))
                         for s in range(0, len(split), batch_size)]) if len(split) else torch.zeros(0)
    model.train(was)
    return out


def last_train_history(train: CFSplit, n_users: int, history_len: int) -> CFSplit:
    """Per user: the last `history_len` train interactions (a history 'after' the train period).

    Built from each user's latest train row: its history + the row itself, keeping the last K.
    Rows must be in time order (prepare writes them so).
    """
    n = len(train)
    last = torch.full((n_users,), -1, dtype=torch.long)
    last.scatter_reduce_(0, train.user, torch.arange(n), reduce="amax")
    users = torch.nonzero(last >= 0).flatten()
    rows = train.take(last[users])
    items = torch.cat([rows.hist_items, rows.item[:, None]], 1)[:, 1:]
    labels = torch.cat([rows.hist_labels, rows.label.long()[:, None]], 1)[:, 1:]
    mask = torch.cat([rows.hist_mask, torch.ones(len(users), 1, dtype=torch.bool)], 1)[:, 1:]
    return CFSplit(users, rows.item, rows.label, items[:, -history_len:], labels[:, -history_len:],
                   mask[:, -history_len:])


def train_cf(train: CFSplit, valid: CFSplit, n_users: int, n_items: int, cfg: CFConfig) -> CFResult:
    """Pointwise BCE training with early stopping on valid AUC. Keeps the best epoch's weights."""
    cfg.validate()
    if len(train) == 0 or len(valid) == 0:
        raise DataError(f"empty split (train={len(train)}, valid={len(valid)})",
                        fix="prepare with a non-zero valid fraction and enough interactions", reason="empty")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    train, valid = train.to(device), valid.to(device)
    model = build_model(cfg, n_users, n_items).to(device)
    if isinstance(model, LightGCN):
        pos = train.label > 0.5
        model.adjacency = normalized_adjacency(train.user[pos], train.item[pos], n_users, n_items)
    dense = isinstance(model, (SASRec, _TargetAware))
    if dense:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        # Adam's weight_decay would shrink *every* embedding row on every step (rows absent from the
        # batch get a pure decay gradient that Adam rescales to a full-size step), so the L2 term is
        # applied to the batch's rows only.
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    valid_y = valid.label.cpu().numpy().astype(np.int64)
    best_auc, best_epoch, best_state, history = -math.inf, -1, None, []
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    # one bar over steps (not epochs): an epoch of SASRec at MovieLens-1M size takes minutes on a CPU
    bar = _progress(cfg.max_epochs * steps_per_epoch, cfg.progress, f"train-cf {cfg.model}")
    for epoch in range(cfg.max_epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(train), generator=gen).to(device)
        total = 0.0
        for s in range(0, len(train), cfg.batch_size):
            batch = train.take(perm[s:s + cfg.batch_size])
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
            if not dense and cfg.weight_decay:
                loss = loss + cfg.weight_decay * model.l2(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            if bar is not None:
                bar.update(1)
        v_auc = auc(valid_y, predict(model, valid).cpu().numpy())
        history.append({"epoch": epoch, "train_loss": total / len(train), "valid_auc": v_auc,
                        "seconds": time.time() - t0})
        if v_auc > best_auc:
            best_auc, best_epoch = v_auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if bar is not None:
            bar.set_postfix(epoch=epoch, loss=f"{total / len(train):.4f}", valid_auc=f"{v_auc:.4f}",
                            best=f"{best_auc:.4f}")
        if epoch - best_epoch >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model = model.cpu()  # results and exports live on the CPU
    if isinstance(model, LightGCN):
        model.adjacency = model.adjacency.to("cpu")
    train = train.to("cpu")
    model.eval()
    log.info("train-cf %s on %s: best valid AUC %.4f at epoch %d (%d epochs run)", cfg.model, device, best_auc,
             best_epoch, len(history))
    user_hist = last_train_history(train, n_users, cfg.history_len) if isinstance(model, SASRec) else None
    return CFResult(model, cfg, best_epoch, best_auc, history, user_hist)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None

    return tqdm(total=total, desc=desc, unit="step", disable=None)  # None: off when not a TTY


# ----------------------------------------------------------------------------------------------------
# export / load


@dataclass
class CFExport:
    """A loaded export. user (n_users, d), item (n_items, d) float32; meta; id maps as DataFrames."""

    user: torch.Tensor
    item: torch.Tensor
    meta: dict
    users: pd.DataFrame
    items: pd.DataFrame
    path: Path

    @property
    def user_vector(self) -> str:
        """table | history | target_aware: how injection gets a row's user vector (see the module docstring).
        Exports written before the key existed: SASRec encodes the row's history, the others are tables."""
        return self.meta.get("user_vector") or USER_VECTOR.get(self.meta.get("model"), "table")

    def score(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """(n,) dot-product logits of the *tables* for contiguous ids (table models; see score_split)."""
        return (self.user[user_ids] * self.item[item_ids]).sum(-1)

    def load_encoder(self) -> nn.Module:
        """The SASRec / DCN / DIN encoder (eval mode) from ``<model>.safetensors``, for per-row user vectors."""
        model = self.meta.get("model")
        if model not in ENCODERS:
            raise CheckpointError(f"{self.path}: a {model} export has no encoder (tables only)")
        if getattr(self, "_encoder", None) is None:
            c = self.meta["config"]
            m = build_model(CFConfig(**{**c, "dropout": 0.0, "extra": c.get("extra") or {}}), self.meta["n_users"],
                            self.meta["n_items"])
            m.load_state_dict(load_file(str(self.path / f"{model}.safetensors")))
            self._encoder = m.eval()
        return self._encoder

    def load_sasrec(self) -> SASRec:
        """The SASRec encoder (eval mode), for per-sample history encoding."""
        if self.meta.get("model") != "sasrec":
            raise CheckpointError(f"{self.path}: not a SASRec export (model={self.meta.get('model')})")
        return self.load_encoder()

    @torch.no_grad()
    def row_user_vectors(self, split: CFSplit, batch_size: int = 4096) -> torch.Tensor:
        """(n, d) user vectors of the rows of `split`: the table row (table models), the row's history encoded
        (SASRec), or encode_user(user, target, history) (DCN, DIN)."""
        if self.user_vector == "table":
            return self.user[split.user]
        enc = self.load_encoder()
        out = []
        for s in range(0, len(split), batch_size):
            b = split.take(torch.arange(s, min(s + batch_size, len(split))))
            out.append(enc.encode(b.hist_items, b.hist_labels, b.hist_mask) if isinstance(enc, SASRec)
                       else enc.encode_user(b.user, b.item, b.hist_items, b.hist_labels, b.hist_mask))
        return torch.cat(out).float() if out else torch.zeros(0, self.user.shape[1])

    @torch.no_grad()
    def score_split(self, split: CFSplit) -> torch.Tensor:
        """(n,) logits of the rows as the encoder scores them: <row user vector, item row>."""
        return (self.row_user_vectors(split) * self.item[split.item]).sum(-1)


def export_cf(result: CFResult, out_dir: str | Path, prepared_dir: str | Path, extra_meta: dict | None = None) -> Path:
    """Write embeddings.safetensors (+ <model>.safetensors for encoders), id maps and cf_meta.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = result.model
    with torch.no_grad():
        if isinstance(model, SASRec):
            user, item = model.eval().tables(result.user_history)
        else:
            user, item = model.eval().tables()  # LightGCN: propagated once, here; DCN/DIN: the id embeddings
    save_file({"user": user.detach().float().cpu().contiguous(), "item": item.detach().float().cpu().contiguous()},
              str(out / "embeddings.safetensors"))
    name = result.config.model
    if name in ENCODERS:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    prepared = Path(prepared_dir)
    for fname in ("users.parquet", "items.parquet"):
        shutil.copyfile(prepared / fname, out / fname)
    cfg = asdict(result.config)
    tables = {"mf": "mf embedding", "lightgcn": "lightgcn layer-mean propagated",
              "sasrec": "sasrec encoding of each user's last train history", "dcn": "dcn user-id embedding",
              "din": "din user-id embedding"}
    meta = {"model": name, "dim": int(user.shape[1]), "n_users": int(user.shape[0]),
            "n_items": int(item.shape[0]), "score": "dot", "propagated": isinstance(model, LightGCN),
            "user_table": tables[name], "user_vector": USER_VECTOR[name],
            "best_epoch": result.best_epoch, "valid_auc": result.valid_auc, "history": result.history,
            "config": cfg, "prepared_dir": str(prepared.resolve())}
    meta.update(extra_meta or {})
    (out / "cf_meta.json").write_text(json.dumps(meta, indent=1))
    return out


def load_cf_export(path: str | Path) -> CFExport:
    """Load an export folder; checks that table shapes agree with the meta file and the id maps."""
    p = Path(path)
    need = ["embeddings.safetensors", "cf_meta.json", "users.parquet", "items.parquet"]
    missing = [n for n in need if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"{p}: missing {missing}; pass the folder written by `distthink rec train-cf`")
    meta = json.loads((p / "cf_meta.json").read_text())
    t = load_file(str(p / "embeddings.safetensors"))
    users, items = pd.read_parquet(p / "users.parquet"), pd.read_parquet(p / "items.parquet")
    if meta.get("model") in ENCODERS and not (p / f"{meta['model']}.safetensors").is_file():
        raise CheckpointError(f"{p}: a {meta['model']} export needs {meta['model']}.safetensors (its encoder). Fix: "
                              "export it again with `distthink rec train-cf`")
    if t["user"].shape != (meta["n_users"], meta["dim"]) or t["item"].shape != (meta["n_items"], meta["dim"]) \
            or len(users) != meta["n_users"] or len(items) != meta["n_items"]:
        raise CheckpointError(f"{p}: table shapes {tuple(t['user'].shape)}/{tuple(t['item'].shape)} and id maps "
                              f"({len(users)} users, {len(items)} items) disagree with cf_meta.json")
    return CFExport(t["user"], t["item"], meta, users, items, p)
