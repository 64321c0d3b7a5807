"""The ThinkRec gate rule: which of the K group experts (or the global adapter) serves a user.

w = softmax(cos(e_u, c_k) / tau) over the K group centroids c_k, H(w) = -sum w log w (nats), then, in ThinkRec's
order:

1. H(w) > entropy_frac * ln K  -> the global adapter alone (the user fits no group well);
2. elif max w > 0.5 + expert_margin / K -> the top expert alone (one-hot);
3. else the experts fused with w (global weight 0).

The space of the comparison (`GateConfig.space`): ``raw`` (ThinkRec's) compares the user's CF vector e_u as
exported with the raw group means (mean of the member users' CF vectors, ``centroids_raw`` of `rec group`);
``standardised`` compares z_u = (e_u - scaler_mean) / scaler_scale with the standardised centroids, the space
`rec group` clusters in (`grouping.to_gate_space`). Applied per sample, vectorised. The weights feed the generic
MoLoRA layers of distthink.models.molora (`set_gates`); the rule itself belongs to ThinkRec, so it lives here.

With the default thresholds (0.6, 0.95) the order of tests 1 and 2 never matters: a w whose top weight passes
0.5 + 0.6/K has at most the entropy of the rest spread evenly, which stays below 0.95 ln K for every K (checked in
tests/models/test_molora.py). With other settings both tests can pass for the same w; the entropy test then wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from distthink.errors import ConfigError, DistthinkError
from distthink.models.molora import hard_gate
from distthink.models.molora_export import load_molora_adapters
from distthink.tasks.thinkrec.grouping import load_groups, to_gate_space

BRANCH_EXPERT, BRANCH_GLOBAL, BRANCH_FUSE = 0, 1, 2
BRANCH_NAMES = ("expert", "global", "fuse")
GATE_SPACES = ("raw", "standardised")
RULE = ("w = softmax(cos(u, c_k)/tau) over K centroids; H(w) > entropy_frac*ln K -> global; elif max w > 0.5 + "
        "expert_margin/K -> that expert; else fuse experts with w. space raw: u = e_u, c_k = raw group means; "
        "space standardised: u = (e_u - scaler_mean)/scaler_scale, c_k = standardised centroids")


@dataclass
class GateConfig:
    """Entropy gate settings (ThinkRec's released values). N below is the number of group experts K."""

    tau: float = 0.1             # softmax temperature on cosine similarities
    expert_margin: float = 0.6   # one expert alone when max w > 0.5 + expert_margin / N
    entropy_frac: float = 0.95   # global adapter when H(w) > entropy_frac * ln N (nats); tested first
    space: str = "raw"           # raw (ThinkRec: CF vectors vs raw group means) | standardised

    def validate(self, prefix: str = "molora gate ") -> None:
        """ConfigError naming `prefix` + the field and the fix (prefix e.g. "task.options.molora.")."""
        for name in ("tau", "expert_margin", "entropy_frac"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{prefix}{name}={v!r} must be a number. Fix: e.g. {getattr(GateConfig, name)}")
        if not self.tau > 0:
            raise ConfigError(f"{prefix}tau={self.tau} must be > 0. Fix: e.g. 0.1 (ThinkRec)")
        if not 0 <= self.entropy_frac <= 1:
            raise ConfigError(f"{prefix}entropy_frac={self.entropy_frac} must be in [0, 1]. Fix: e.g. 0.95 (ThinkRec)")
        if self.expert_margin < 0:
            raise ConfigError(f"{prefix}expert_margin={self.expert_margin} must be >= 0. Fix: e.g. 0.6 (ThinkRec)")
        if self.space not in GATE_SPACES:
            raise ConfigError(f"{prefix}space={self.space!r}. Fix: use raw (ThinkRec) or standardised")


class GateDecision(NamedTuple):
    """Per-sample gate output. S samples, K group experts.

    weights (S, K+1): mixing weights over the adapters (column K = global adapter), rows sum to 1.
    branch  (S,) long: BRANCH_EXPERT (0), BRANCH_GLOBAL (1) or BRANCH_FUSE (2).
    probs   (S, K): softmax(cos / tau) before the branch rule.
    entropy (S,): H(probs) in nats.
    """

    weights: torch.Tensor
    branch: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor


def entropy_gate(user_vectors: torch.Tensor, centroids: torch.Tensor, cfg: GateConfig | None = None) -> GateDecision:
    """The ThinkRec gate, per sample and vectorised (rule in the module docstring).

    user_vectors (S, d) in the centroids' space (EntropyGate maps raw CF vectors there), centroids (K, d), K >= 2.
    """
    cfg = cfg or GateConfig()
    cfg.validate()
    if user_vectors.ndim != 2 or centroids.ndim != 2 or user_vectors.shape[1] != centroids.shape[1]:
        raise DistthinkError(f"entropy_gate: user_vectors (S, d) and centroids (K, d) must share d, got "
                             f"{tuple(user_vectors.shape)} and {tuple(centroids.shape)}")
    k = centroids.shape[0]
    if k < 2:
        raise ConfigError(f"the entropy gate needs at least 2 groups, got {k}")
    u = user_vectors.to(torch.float32)
    c = centroids.to(device=u.device, dtype=torch.float32)
    cos = F.normalize(u, dim=-1) @ F.normalize(c, dim=-1).T                     # (S, K)
    probs = torch.softmax(cos / cfg.tau, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)             # 0 * log 0 := 0
    top_w, top = probs.max(dim=-1)
    flat = entropy > cfg.entropy_frac * math.log(k)                             # tested first, as ThinkRec
    alone = ~flat & (top_w > 0.5 + cfg.expert_margin / k)
    weights = torch.zeros(u.shape[0], k + 1, dtype=torch.float32, device=u.device)
    weights[:, :k] = probs
    # the three branches as row-wise selections (no per-sample loop)
    one_hot = F.one_hot(top, k + 1).to(weights.dtype)
    glob = F.one_hot(torch.full_like(top, k), k + 1).to(weights.dtype)
    weights = torch.where(alone[:, None], one_hot, torch.where(flat[:, None], glob, weights))
    branch = torch.full_like(top, BRANCH_FUSE)
    branch[flat] = BRANCH_GLOBAL
    branch[alone] = BRANCH_EXPERT
    return GateDecision(weights, branch, probs, entropy)


def branch_counts(branch: torch.Tensor) -> dict:
    """{'expert': n, 'global': n, 'fuse': n} from GateDecision.branch."""
    counts = torch.bincount(branch.reshape(-1).long().cpu(), minlength=3).tolist()
    return dict(zip(BRANCH_NAMES, counts))


class EntropyGate:
    """The gate with its centroids (and scaler), as saved by `distthink rec group` and stored in molora.json.

    centroids (K, d) live in ``cfg.space``: raw group means for ``raw``, standardised centroids for
    ``standardised``; scaler_mean/scaler_scale (d,) map raw CF vectors to the standardised space (unused in raw).
    """

    def __init__(self, centroids, scaler_mean=None, scaler_scale=None, cfg: GateConfig | None = None):
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        d = self.centroids.shape[1]
        f32 = torch.float32
        self.scaler_mean = torch.zeros(d) if scaler_mean is None else torch.as_tensor(scaler_mean, dtype=f32)
        self.scaler_scale = torch.ones(d) if scaler_scale is None else torch.as_tensor(scaler_scale, dtype=f32)
        self.cfg = cfg or GateConfig()
        self.cfg.validate()

    @property
    def num_experts(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def from_groups(cls, groups_dir: str | Path, cfg: GateConfig | None = None) -> "EntropyGate":
        """From the folder written by `distthink rec group` (groups.safetensors): the raw group means
        (``centroids_raw``) for space raw, the standardised centroids for space standardised."""
        cfg = cfg or GateConfig()
        g = load_groups(groups_dir)
        if cfg.space == "raw":
            if "centroids_raw" not in g:
                raise ConfigError(f"{groups_dir}: groups.safetensors has no centroids_raw (written by `rec group` "
                                  "since the raw gate space). Fix: run `distthink rec group` again, or set "
                                  "task.options.molora.gate_space: standardised")
            return cls(g["centroids_raw"], g["scaler_mean"], g["scaler_scale"], cfg)
        return cls(g["centroids"], g["scaler_mean"], g["scaler_scale"], cfg)

    def to_gate_space(self, raw_user_vectors: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(raw_user_vectors, dtype=torch.float32)
        if self.cfg.space == "raw":
            return x
        return to_gate_space(x, self.scaler_mean.to(x.device), self.scaler_scale.to(x.device))

    def __call__(self, raw_user_vectors: torch.Tensor) -> GateDecision:
        """raw CF user vectors (S, d), as exported by the CF encoder -> GateDecision."""
        return entropy_gate(self.to_gate_space(raw_user_vectors), self.centroids, self.cfg)

    def hard(self, group_ids: torch.Tensor) -> torch.Tensor:
        return hard_gate(group_ids, self.num_experts)

    def to_json(self) -> dict:
        return {**asdict(self.cfg), "centroids": self.centroids.tolist(), "scaler_mean": self.scaler_mean.tolist(),
                "scaler_scale": self.scaler_scale.tolist(), "rule": RULE}

    @classmethod
    def from_json(cls, d: dict) -> "EntropyGate":
        # molora.json files written before the setting carry standardised centroids (the only space then)
        space = d.get("space") if d.get("space") in GATE_SPACES else "standardised"
        cfg = GateConfig(tau=d["tau"], expert_margin=d["expert_margin"], entropy_frac=d["entropy_frac"], space=space)
        return cls(d["centroids"], d.get("scaler_mean"), d.get("scaler_scale"), cfg)


def load_molora(model: torch.nn.Module, folder: str | Path,
                dropout: float | None = None) -> tuple[torch.nn.Module, EntropyGate | None]:
    """Rebuild a stage-3 MoLoRA model from its export (distthink.models.molora_export) with its gate.

    Returns (model, gate): the stored EntropyGate, or None when the export has none.
    dropout: LoRA input dropout for further training (default: the exported value).
    """
    model, meta = load_molora_adapters(model, folder, dropout=dropout)
    return model, EntropyGate.from_json(meta["gate"]) if meta.get("gate") else None
