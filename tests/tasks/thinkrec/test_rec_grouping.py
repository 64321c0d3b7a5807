"""User grouping: recovers planted clusters, centroids live in the saved standardised space, CLI outputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from _tolerance import fp_tol

from distthink.errors import ConfigError
from distthink.tasks.thinkrec.grouping import GroupConfig, assign, fit_groups, load_groups, to_gate_space


def _blobs(seed=0, n=60):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], dtype=float)
    truth = np.repeat(np.arange(3), n)
    # raw vectors with very different scales per dimension: standardisation matters
    x = (centers[truth] + rng.normal(0, 1, (3 * n, 4))) * np.array([1.0, 100.0, 0.01, 1.0])
    return x, truth


def _same_partition(a, b):
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method", ["kmeans", "ward"])
def test_auto_k_recovers_planted_groups(method):
    x, truth = _blobs()
    res = fit_groups(x, GroupConfig(method=method, k_min=2, k_max=6, seed=0))
    assert res.k == 3 and _same_partition(res.labels, truth)
    assert set(res.silhouette_curve) == {2, 3, 4, 5, 6}
    assert res.silhouette == max(res.silhouette_curve.values())
    # centroids are in the standardised space: mean of (x - mean)/scale per group
    z = to_gate_space(x, res.scaler_mean.astype(float), res.scaler_scale.astype(float))
    # the scaler and centroids are stored in float32 (the rest is float64): z's mean is off by the rounding of
    # mean / scale, each centroid also by its own rounding and that of z (~ |z| + |mean / scale|)
    off = np.abs(res.scaler_mean / res.scaler_scale).max()
    np.testing.assert_allclose(z.mean(0), 0, atol=fp_tol(torch.float32, off))
    for g in range(3):
        np.testing.assert_allclose(res.centroids[g], z[res.labels == g].mean(0),
                                   atol=fp_tol(torch.float32, np.abs(z).max() + off))
    assert (assign(z, res.centroids.astype(float)) == res.labels).all()


def test_seeded_and_config_errors():
    x, _ = _blobs()
    a = fit_groups(x, GroupConfig(n_groups=4, seed=3, silhouette_sample=50))
    b = fit_groups(x, GroupConfig(n_groups=4, seed=3, silhouette_sample=50))
    assert (a.labels == b.labels).all() and a.silhouette == b.silhouette
    with pytest.raises(ConfigError):
        fit_groups(x, GroupConfig(n_groups=1))
    with pytest.raises(ConfigError):
        fit_groups(x[:3], GroupConfig(n_groups=5))
    with pytest.raises(ConfigError):
        fit_groups(x, GroupConfig(method="dbscan"))


@pytest.mark.slow
def test_cli_synth_prepare_train_cf_group(tmp_path, capsys):
    from distthink.cli import main

    raw, prep, cf, grp = (tmp_path / n for n in ("raw", "prep", "cf", "grp"))
    assert main(["rec", "synth", "--out", str(raw), "--users", "80", "--items", "60", "--format", "parquet"]) == 0
    assert main(["rec", "prepare", "--input", str(raw / "interactions.parquet"), "--items",
                 str(raw / "items.parquet"), "--out", str(prep), "--reasons", "template"]) == 0
    assert main(["rec", "train-cf", "--data", str(prep), "--model", "lightgcn", "--out", str(cf), "--dim", "8",
                 "--epochs", "5", "--no-progress"]) == 0
    meta = json.loads((cf / "cf_meta.json").read_text())
    assert meta["propagated"] and 0 <= meta["test_auc"] <= 1 and "test_uauc_skipped" in meta
    capsys.readouterr()
    assert main(["rec", "group", "--cf", str(cf), "--out", str(grp), "--data", str(prep), "--k-max", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    g = load_groups(grp)
    assert g["centroids"].shape == (printed["n_groups"], 8) and g["scaler_scale"].shape == (8,)
    assert sum(g["meta"]["sizes"]) == len(g["table"]) == 80
    for name in ("user_map.png", "silhouette.png"):
        assert (grp / name).stat().st_size > 1000
    # per-group splits partition each split exactly
    for split in ("train", "valid", "test"):
        whole = pd.read_parquet(prep / f"{split}.parquet")
        parts = [pd.read_parquet(grp / "splits" / f"group_{k}" / f"{split}.parquet") for k in range(printed["n_groups"])]
        assert sum(len(p) for p in parts) == len(whole)
        table = g["table"].set_index("user_id")["group"]
        for k, p in enumerate(parts):
            assert (table.reindex(p["user_id"]).to_numpy() == k).all()
    # user errors come back as exit code 2, not a traceback
    assert main(["rec", "prepare", "--input", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 2
    assert main(["rec", "group", "--cf", str(cf), "--out", str(grp), "--n-groups", "one"]) == 2
    assert main(["rec", "prepare", "--input", str(raw / "interactions.parquet"), "--format", "pickle",
                 "--out", str(tmp_path / "y")]) == 2
