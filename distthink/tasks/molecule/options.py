"""`task.options` of the molecule task (docs/molecules.md), validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from distthink.config import Config, load_options, warn_deprecated
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


GRAPH_TOKEN = "<|graph|>"
THINK_MODES = ("off", "dynamic", "supervise", "free")
TRAIN_PARTS = ("encoder", "projector", "llm", "all")


# Spellings of shared concepts that moved to the engine's config (accepted until 0.3, with one warning line).
DEPRECATED = {"on_error": "use data.on_error (one setting for every task)",
              "max_samples": "use data.max_train_samples and data.max_eval_samples"}


@dataclass
class MoleculeOptions:
    """`task.options` of the molecule task (every key optional)."""

    think_mode: str = "off"            # off | dynamic | supervise | free
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
    # think_mode=free (on-policy thoughts): regenerate a sample's thought when it is this many steps old
    regen_every: int = 1
    max_think_tokens: int = 32         # thinking budget per generated thought (unclosed ones are closed, counted)
    temperature: float = 1.0           # sampling of the thoughts
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> "MoleculeOptions":
        raw = dict(cfg.task.options or {})
        if raw.get("think_mode") == "supervised":  # data.policy.think's word for the same thing is "supervise"
            warn_deprecated("task.options.think_mode=supervised", "write think_mode: supervise")
            raw["think_mode"] = "supervise"
        if "on_error" in raw and raw["on_error"] != cfg.data.on_error:
            cfg.data.on_error = raw["on_error"]
        if raw.get("max_samples"):
            for split in ("max_train_samples", "max_eval_samples"):
                if not getattr(cfg.data, split):
                    setattr(cfg.data, split, int(raw["max_samples"]))
        if isinstance(raw.get("train_parts"), str):
            raw["train_parts"] = [raw["train_parts"]]
        opts = load_options(cls, raw, "task.options.", deprecated=DEPRECATED)
        choices = {"think_mode": THINK_MODES, "dynamic": ("argmax", "soft"), "conv": ("gine", "gin"),
                   "pool": ("mean", "add", "max")}
        for key, allowed in choices.items():
            if getattr(opts, key) not in allowed:
                raise ConfigError(f"task.options.{key}={getattr(opts, key)!r}. Fix: use one of {list(allowed)}")
        for key in ("graph_tokens", "hidden", "num_layers", "proj_mult", "regen_every", "max_think_tokens"):
            if not isinstance(getattr(opts, key), int) or getattr(opts, key) < 1:
                raise ConfigError(f"task.options.{key}={getattr(opts, key)!r}. Fix: a positive integer")
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
