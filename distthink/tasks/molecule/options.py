"""`task.options` of the molecule task (docs/molecules.md), validated at start-up."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from distthink.config import Config
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


GRAPH_TOKEN = "<|graph|>"
THINK_MODES = ("off", "dynamic", "supervised", "free")
TRAIN_PARTS = ("encoder", "projector", "llm", "all")


@dataclass
class MoleculeOptions:
    """`task.options` of the molecule task (every key optional)."""

    think_mode: str = "off"            # off | dynamic | supervised | free
    dynamic: str = "argmax"            # argmax | soft (think_mode=dynamic)
    use_graph: bool = True             # False = text-only ablation (same SMILES in the prompt, no graph tokens)
    include_smiles: bool = True
    graph_tokens: int = 1              # k <|graph|> tokens (projected vectors) per molecule
    conv: str = "gine"
    hidden: int = 64
    num_layers: int = 3
    pool: str = "mean"
    dropout: float = 0.0
    proj_mult: int = 4
    train_parts: list = field(default_factory=lambda: ["all"])  # encoder | projector | llm | all
    on_error: str = "raise"            # invalid SMILES / rows: raise | skip (counted)
    max_samples: int | None = None     # cap per split (smoke runs)
    # think_mode=free (on-policy thoughts): regenerate a sample's thought when it is this many steps old
    regen_every: int = 1
    max_think_tokens: int = 32         # thinking budget per generated thought (unclosed ones are closed, counted)
    temperature: float = 1.0           # sampling of the thoughts
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> "MoleculeOptions":
        raw = dict(cfg.task.options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in names:
                raise ConfigError(f"task.options.{key} is not an option of the molecule task. Fix: use one of "
                                  f"{sorted(names)} (docs/molecules.md)")
        opts = cls(**raw)
        choices = {"think_mode": THINK_MODES, "dynamic": ("argmax", "soft"), "conv": ("gine", "gin"),
                   "pool": ("mean", "add", "max"), "on_error": ("raise", "skip")}
        for key, allowed in choices.items():
            if getattr(opts, key) not in allowed:
                raise ConfigError(f"task.options.{key}={getattr(opts, key)!r}. Fix: use one of {list(allowed)}")
        for key in ("graph_tokens", "hidden", "num_layers", "proj_mult", "regen_every", "max_think_tokens"):
            if not isinstance(getattr(opts, key), int) or getattr(opts, key) < 1:
                raise ConfigError(f"task.options.{key}={getattr(opts, key)!r}. Fix: a positive integer")
        if isinstance(opts.train_parts, str):
            opts.train_parts = [opts.train_parts]
        bad = [p for p in opts.train_parts if p not in TRAIN_PARTS]
        if bad or not opts.train_parts:
            raise ConfigError(f"task.options.train_parts={opts.train_parts!r}. Fix: a non-empty list of "
                              f"{list(TRAIN_PARTS)} (llm = the LoRA adapters when lora.enabled, else all LM weights)")
        if not opts.use_graph and not opts.include_smiles:
            raise ConfigError("task.options: use_graph=false and include_smiles=false leave nothing to describe. "
                              "Fix: enable one of them")
        if opts.think_mode == "dynamic" and cfg.loss.impl != "fused":
            raise ConfigError("task.options.think_mode=dynamic needs the fused loss's dynamic weights. "
                              "Fix: set loss.impl=fused")
        if opts.think_mode == "free":
            if cfg.batch.mode != "samples":
                raise ConfigError("task.options.think_mode=free changes sample lengths at every regeneration, so "
                                  "the token-budget plan would go stale. Fix: batch.mode=samples")
        return opts

    def trains(self, part: str) -> bool:
        return "all" in self.train_parts or part in self.train_parts

    def graph_config(self) -> dict:
        return {"conv": self.conv, "hidden": self.hidden, "num_layers": self.num_layers, "pool": self.pool,
                "dropout": self.dropout, "proj_mult": self.proj_mult, "graph_tokens": self.graph_tokens}
