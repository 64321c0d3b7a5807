"""User groups for the mixture-of-LoRA stage: clustering of CF user vectors.

**Spaces.** By default clustering runs on standardised user vectors ``z = (e - scaler_mean) / scaler_scale``
(per-dimension mean and standard deviation over the users that were fitted; ``GroupConfig.space=raw``, ThinkRec's
choice, clusters the raw vectors: scaler 0 / 1). ``centroids`` live in the clustering space; ``centroids_raw``
are the raw group means (mean of the member users' CF vectors as exported), what ThinkRec's gate compares the raw
CF vector with. The gate (distthink/tasks/thinkrec/gate.py) uses one pair consistently: raw vector vs
``centroids_raw`` (gate space raw, the default) or ``to_gate_space(e_u)`` vs ``centroids`` (standardised).

Output folder of `group_users`:

- ``user_groups.parquet``: user_id (contiguous, as in the CF export), raw_user_id, group (int),
  fitted (bool: False for cold users that were only assigned to the nearest centroid).
- ``groups.safetensors``: ``centroids`` (K, d) float32 in the clustering space, ``centroids_raw`` (K, d) the
  raw group means over the fitted members, ``scaler_mean`` (d,), ``scaler_scale`` (d,).
- ``groups.json``: n_groups, method, sizes (list, by group), silhouette (of the chosen k),
  silhouette_curve ({k: score} for auto), space (text), cf_dir, cf_model, seed, fitted_users.
- ``splits/group_<g>/{train,valid,test}.parquet`` when a prepared folder is given.
- ``user_map.png`` (PCA 2-D of the standardised vectors, coloured by group, centroids marked) and
  ``silhouette.png`` (score per k), unless plots are off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file
from sklearn.cluster import AgglomerativeClustering, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from distthink.errors import CheckpointError, ConfigError, DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec.cf_source import ExportSource, open_cf_source
from distthink.tasks.thinkrec.prepare import SPLITS, find_split, read_split

log = get_logger(__name__)
SPACES = {"standardised": "standardised: z = (e - scaler_mean) / scaler_scale, e = CF user vector from the export",
          "raw": "raw: the CF user vectors as exported (scaler_mean 0, scaler_scale 1)"}


@dataclass
class GroupConfig:
    n_groups: int | str = "auto"   # "auto": k in k_min..k_max with the best silhouette
    k_min: int = 2
    k_max: int = 10
    method: str = "kmeans"         # "kmeans" (MiniBatchKMeans) or "ward" (agglomerative, small sets)
    silhouette_sample: int = 10000  # users sampled (seeded) to score silhouette
    seed: int = 0
    only_trained_users: bool = True
    plots: bool = True
    batch_size: int = 1024
    n_init: int = 3
    space: str = "standardised"    # clustering space: standardised | raw (ThinkRec)

    def validate(self, n_points: int) -> list[int]:
        """The candidate k values. Raises ConfigError on impossible settings."""
        if self.method not in ("kmeans", "ward"):
            raise ConfigError(f"group.method must be kmeans or ward, got {self.method!r}")
        if self.space not in SPACES:
            raise ConfigError(f"group space {self.space!r}. Fix: use {' or '.join(SPACES)}")
        if self.n_groups == "auto":
            if not 2 <= self.k_min <= self.k_max:
                raise ConfigError(f"need 2 <= k_min <= k_max, got {self.k_min}..{self.k_max}")
            ks = [k for k in range(self.k_min, self.k_max + 1) if k < n_points]
        elif isinstance(self.n_groups, int) and self.n_groups >= 2:
            ks = [self.n_groups]
        else:
            raise ConfigError(f"n_groups must be 'auto' or an integer >= 2, got {self.n_groups!r}")
        if not ks or ks[0] >= n_points:
            raise ConfigError(f"cannot form {ks[0] if ks else self.k_min} groups from {n_points} users; "
                              "use fewer groups or more users")
        if self.method == "ward" and n_points > 20000:
            raise ConfigError(f"ward clustering of {n_points} users needs O(n^2) memory; use method kmeans")
        return ks


@dataclass
class GroupResult:
    """labels (n,) int over the fitted rows; centroids (K, d) in the clustering space, centroids_raw (K, d) the raw
    group means; scaler."""

    labels: np.ndarray
    centroids: np.ndarray
    centroids_raw: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    k: int
    silhouette: float
    silhouette_curve: dict


def standardize_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale (std; 1 where a dimension is constant, to avoid dividing by 0)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    return mean, scale


def to_gate_space(user_vectors, scaler_mean, scaler_scale):
    """Apply the saved scaler: (..., d) raw CF vectors -> (..., d) standardised (numpy or torch)."""
    return (user_vectors - scaler_mean) / scaler_scale


def _cluster(z: np.ndarray, k: int, cfg: GroupConfig) -> tuple[np.ndarray, np.ndarray]:
    if cfg.method == "kmeans":
        km = MiniBatchKMeans(n_clusters=k, random_state=cfg.seed, batch_size=cfg.batch_size, n_init=cfg.n_init)
        km.fit(z)
        # Mini-batch centres are approximate: finish with exact Lloyd steps so that every label is the
        # nearest centroid and every centroid is exactly its group's mean (what the gate compares to).
        return _lloyd(z, km.cluster_centers_.astype(np.float64))

    labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
    return labels, np.stack([z[labels == g].mean(axis=0) for g in range(k)])


def _lloyd(z: np.ndarray, centroids: np.ndarray, max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    labels = assign(z, centroids)
    for _ in range(max_iter):
        counts = np.bincount(labels, minlength=len(centroids))
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, z)
        # an empty group keeps its previous centre rather than becoming NaN
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        new = assign(z, centroids)
        if (new == labels).all():
            break
        labels = new
    return labels, centroids


def fit_groups(x: np.ndarray, cfg: GroupConfig) -> GroupResult:
    """Standardise x (n, d) (space standardised), cluster, and pick k by silhouette when cfg.n_groups == 'auto'."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise DataError("user vectors must be a finite (n, d) matrix", field="user",
                        fix="re-export the CF embeddings", reason="bad_value")
    ks = cfg.validate(len(x))
    mean, scale = standardize_fit(x) if cfg.space == "standardised" else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    z = (x - mean) / scale
    sample = min(cfg.silhouette_sample, len(z))
    curve, best = {}, None
    for k in ks:
        labels, centroids = _cluster(z, k, cfg)
        if len(np.unique(labels)) < 2:
            score = -1.0  # degenerate clustering: silhouette undefined, never chosen over a real one
        else:
            score = float(silhouette_score(z, labels, sample_size=sample if sample < len(z) else None,
                                           random_state=cfg.seed))
        curve[k] = score
        if best is None or score > best[0]:
            best = (score, k, labels, centroids)
        log.info("groups: k=%d silhouette=%.4f", k, score)
    score, k, labels, centroids = best
    raw = np.stack([x[labels == g].mean(axis=0) if (labels == g).any() else centroids[g] * scale + mean
                    for g in range(k)])
    return GroupResult(labels.astype(np.int64), centroids.astype(np.float32), raw.astype(np.float32),
                       mean.astype(np.float32), scale.astype(np.float32), k, score, curve)


def assign(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (Euclidean) in the clustering space: (n, d), (K, d) -> (n,) groups."""
    d2 = (z ** 2).sum(1)[:, None] - 2 * z @ centroids.T + (centroids ** 2).sum(1)[None, :]
    return d2.argmin(axis=1)


def group_users(cf_dir: str | Path, out_dir: str | Path, cfg: GroupConfig,
                prepared_dir: str | Path | None = None) -> dict:
    """Cluster the users of a CF export and write the outputs listed in the module docstring."""
    src = open_cf_source(str(cf_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    users = src.users_frame()
    x = src.user[torch.as_tensor(users["user_id"].to_numpy().copy(), dtype=torch.long)].numpy().astype(np.float64)
    fitted = np.ones(len(x), dtype=bool)
    if cfg.only_trained_users and "n_train" in users.columns:
        fitted = users["n_train"].to_numpy() > 0
        log.info("groups: fitting %d users with train interactions, assigning %d cold users", fitted.sum(),
                 (~fitted).sum())
    res = fit_groups(x[fitted], cfg)
    z_all = to_gate_space(x, res.scaler_mean.astype(np.float64), res.scaler_scale.astype(np.float64))
    group = np.empty(len(x), dtype=np.int64)
    group[fitted] = res.labels
    if (~fitted).any():
        group[~fitted] = assign(z_all[~fitted], res.centroids.astype(np.float64))
    table = pd.DataFrame({"user_id": users["user_id"].to_numpy(), "raw_user_id": users["raw_user_id"].astype(str),
                          "group": group, "fitted": fitted})
    table.to_parquet(out / "user_groups.parquet", index=False)
    save_file({"centroids": res.centroids, "centroids_raw": res.centroids_raw, "scaler_mean": res.scaler_mean,
               "scaler_scale": res.scaler_scale}, str(out / "groups.safetensors"))
    sizes = np.bincount(group, minlength=res.k).tolist()
    summary = {"n_groups": res.k, "method": cfg.method, "sizes": sizes, "silhouette": res.silhouette,
               "silhouette_curve": {str(k): v for k, v in res.silhouette_curve.items()}, "space": SPACES[cfg.space],
               "cf_dir": str(Path(cf_dir).resolve()),
               "cf_model": src.export.meta.get("model") if isinstance(src, ExportSource) else "npz", "seed": cfg.seed,
               "fitted_users": int(fitted.sum()), "out": str(out)}
    if prepared_dir is not None:
        summary["splits"] = write_group_splits(prepared_dir, table, out / "splits", res.k)
    if cfg.plots:
        _plots(z_all, group, res, out)
    (out / "groups.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_group_splits(prepared_dir: str | Path, table: pd.DataFrame, out: Path, k: int) -> dict:
    """Split every prepared split by the user's group: splits/group_<g>/<split>.parquet. Returns row counts."""
    g_of = table.set_index("user_id")["group"]
    counts = {}
    for name in SPLITS:
        df = read_split(find_split(prepared_dir, name))
        groups = g_of.reindex(df["user_id"]).to_numpy()
        if np.isnan(groups.astype(np.float64)).any():
            raise DataError("split has users that the CF export does not know", source=str(prepared_dir),
                            field="user_id", fix="group with the CF export trained on this prepared folder",
                            reason="bad_value")
        for g in range(k):
            d = out / f"group_{g}"
            d.mkdir(parents=True, exist_ok=True)
            part = df[groups == g]
            part.to_parquet(d / f"{name}.parquet", index=False)
            counts.setdefault(f"group_{g}", {})[name] = len(part)
    return counts


def _plots(z: np.ndarray, group: np.ndarray, res: GroupResult, out: Path) -> None:
    import matplotlib  # lazy: choose the headless backend before pyplot loads, without changing the caller's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pca = PCA(n_components=2, random_state=0).fit(z)
    p, c = pca.transform(z), pca.transform(res.centroids.astype(np.float64))
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(p[:, 0], p[:, 1], c=group, cmap="tab10", s=6, alpha=0.7)
    ax.scatter(c[:, 0], c[:, 1], c="black", marker="x", s=80, label="centroids")
    ax.set_title(f"users by group (k={res.k}), PCA of the {res_space(res)} CF vectors")
    ax.legend(*sc.legend_elements(), title="group", loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "user_map.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = sorted(res.silhouette_curve)
    ax.plot(ks, [res.silhouette_curve[k] for k in ks], marker="o")
    ax.axvline(res.k, color="grey", ls="--")
    ax.set_xlabel("k")
    ax.set_ylabel("silhouette")
    ax.set_title("silhouette score by number of groups")
    fig.tight_layout()
    fig.savefig(out / "silhouette.png", dpi=100)
    plt.close(fig)


def res_space(res: GroupResult) -> str:
    """'raw' when the result's scaler is the identity, else 'standardised' (for plot titles)."""
    return "raw" if not res.scaler_mean.any() and (res.scaler_scale == 1).all() else "standardised"


def group_tensor_names(path: str | Path) -> set[str]:
    """Names of the tensors in a groups folder's groups.safetensors (header only; no tensor is read)."""
    with safe_open(str(Path(path) / "groups.safetensors"), framework="numpy") as fh:
        return set(fh.keys())


def load_groups(path: str | Path) -> dict:
    """Load a group folder: {'centroids', 'scaler_mean', 'scaler_scale' (torch tensors), 'table', 'meta'}."""
    p = Path(path)
    for name in ("groups.safetensors", "groups.json", "user_groups.parquet"):
        if not (p / name).is_file():
            raise CheckpointError(f"{p}: missing {name}; pass the folder written by `distthink rec group`")
    t = load_file(str(p / "groups.safetensors"))
    return {**t, "table": pd.read_parquet(p / "user_groups.parquet"),
            "meta": json.loads((p / "groups.json").read_text())}
