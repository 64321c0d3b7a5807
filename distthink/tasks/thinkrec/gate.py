"""The ThinkRec gate rule: which of the K group experts (or the global adapter) serves a user.

w = softmax(cos(z_u, c_k) / tau) over the K group centroids c_k, with z_u the user's CF vector mapped to the
groups' standardised space (`grouping.to_gate_space`); if max w > 0.5 + expert_margin / K the top expert alone
(one-hot); else if H(w) >= entropy_frac * ln K the global adapter alone; else the experts fused with w (global
weight 0). Applied per sample, vectorised. The weights feed the generic MoLoRA layers of distthink.models.molora
(`set_gates`); the rule itself belongs to ThinkRec, so it lives here.
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
from distthink.tasks.thinkrec.grouping import SPACE, load_groups, to_gate_space

BRANCH_EXPERT, BRANCH_GLOBAL, BRANCH_FUSE = 0, 1, 2
BRANCH_NAMES = ("expert", "global", "fuse")


@dataclass
class GateConfig:
    """Entropy gate settings (ThinkRec defaults). N below is the number of group experts K."""

    tau: float = 0.1             # softmax temperature on cosine similarities
    expert_margin: float = 0.6   # one expert alone when max w > 0.5 + expert_margin / N
    entropy_frac: float = 0.95   # global adapter when H(w) >= entropy_frac * ln N (nats)

    def validate(self) -> None:
        if not self.tau > 0:
            raise ConfigError(f"molora gate tau must be > 0, got {self.tau}")
        if not 0 <= self.entropy_frac <= 1:
            raise ConfigError(f"molora gate entropy_frac must be in [0, 1], got {self.entropy_frac}")
        if self.expert_margin < 0:
            raise ConfigError(f"molora gate expert_margin must be >= 0, got {self.expert_margin}")


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
    """The ThinkRec gate, per sample and vectorised.

    user_vectors (S, d) in the centroids' space (standardised: see `to_gate_space`), centroids (K, d), K >= 2.
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
    alone = top_w > 0.5 + cfg.expert_margin / k
    flat = ~alone & (entropy >= cfg.entropy_frac * math.log(k))
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
    """The gate with its centroids and scaler, as saved by `distthink rec group` (and in molora.json).

    centroids (K, d) in the standardised space; scaler_mean/scaler_scale (d,) map raw CF vectors there.
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
        """From the folder written by `distthink rec group` (groups.safetensors)."""
        g = load_groups(groups_dir)
        return cls(g["centroids"], g["scaler_mean"], g["scaler_scale"], cfg)

    def to_gate_space(self, raw_user_vectors: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(raw_user_vectors, dtype=torch.float32)
        return to_gate_space(x, self.scaler_mean.to(x.device), self.scaler_scale.to(x.device))

    def __call__(self, raw_user_vectors: torch.Tensor) -> GateDecision:
        """raw CF user vectors (S, d), as exported by the CF encoder -> GateDecision."""
        return entropy_gate(self.to_gate_space(raw_user_vectors), self.centroids, self.cfg)

    def hard(self, group_ids: torch.Tensor) -> torch.Tensor:
        return hard_gate(group_ids, self.num_experts)

    def to_json(self) -> dict:
        return {**asdict(self.cfg), "centroids": self.centroids.tolist(), "scaler_mean": self.scaler_mean.tolist(),
                "scaler_scale": self.scaler_scale.tolist(),
                "rule": "w = softmax(cos(z_u, c_k)/tau), z_u = (e_u - scaler_mean)/scaler_scale; "
                        "max w > 0.5 + expert_margin/K -> that expert; elif H(w) >= entropy_frac*ln K -> global; "
                        "else fuse experts with w", "space": SPACE}

    @classmethod
    def from_json(cls, d: dict) -> "EntropyGate":
        cfg = GateConfig(tau=d["tau"], expert_margin=d["expert_margin"], entropy_frac=d["entropy_frac"])
        return cls(d["centroids"], d.get("scaler_mean"), d.get("scaler_scale"), cfg)


def load_molora(model: torch.nn.Module, folder: str | Path,
                dropout: float | None = None) -> tuple[torch.nn.Module, EntropyGate | None]:
    """Rebuild a stage-3 MoLoRA model from its export (distthink.models.molora_export) with its gate.

    Returns (model, gate): the stored EntropyGate, or None when the export has none.
    dropout: LoRA input dropout for further training (default: the exported value).
    """
    model, meta = load_molora_adapters(model, folder, dropout=dropout)
    return model, EntropyGate.from_json(meta["gate"]) if meta.get("gate") else None
