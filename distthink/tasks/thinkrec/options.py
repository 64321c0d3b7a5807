"""`task.options` of the thinkrec task (docs/thinkrec.md), validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distthink.config import Config, load_options
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.inject import PROJECTOR_ACTIVATIONS
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.cf_source import check_cf_spec
from distthink.tasks.thinkrec.gate import GATE_SPACES, GateConfig
from distthink.tasks.thinkrec.grouping import group_tensor_names
from distthink.tasks.thinkrec.projector_export import check_projector_export

log = get_logger(__name__)


# Spellings of shared concepts that moved to the engine's config (accepted until 0.3, with one warning line).
DEPRECATED = {"max_train_samples": "use data.max_train_samples", "max_eval_samples": "use data.max_eval_samples",
              "projector_mult": "use task.options.mid_mult (same meaning; the default is now 5, as ThinkRec)"}


@dataclass
class ThinkRecOptions:
    """``task.options`` of the thinkrec task (docs/thinkrec.md)."""

    prompt_mode: str = "text"          # text (stage 1) | ids (stage 2/3: id tokens + projector)
    template: str | None = None        # None = prompts.TEMPLATES[prompt_mode]
    cf_export: str | None = None       # `rec train-cf` folder | .npz shards | inline (prompt_mode=ids; cf_source.py)
    rec_score: str = "yes"             # yes | yes_minus_no
    yes_text: str = "Yes"
    no_text: str = "No"
    alpha: float = 0.1                 # reasoning samples: alpha * BCE + beta * LM
    beta: float = 0.9
    theta: float = 0.9                 # label-only samples: theta * BCE + gamma * LM
    gamma: float = 0.1
    reason_ratio: float = 0.2          # share of rows (with a reason) used as reasoning samples
    mid_mult: int = 5                  # projector: Linear(d, mid_mult*d) -> activation -> Linear(., hidden*k)
    activation: str = "relu"           # projector activation: relu (ThinkRec) | gelu
    proj_token_num: int = 1
    train_projector: bool | None = None  # default: prompt_mode == ids
    init_projector: str | None = None  # a stage-2 export folder holding projector.safetensors (loaded by path)
    init_adapter: str | None = None    # a previous stage's adapter export folder (loaded by path)
    freeze_lora: bool = False          # stage 2: LoRA frozen
    molora: dict | None = None         # stage 3: {groups_dir, init_adapter, gate: hard|soft, dropout} (MoLoRAStage)

    @classmethod
    def from_config(cls, cfg: Config) -> "ThinkRecOptions":
        """The run's `task.options`, validated at start-up; the pre-0.2 sample limits move to `data.*`."""
        raw = dict(cfg.task.options or {})
        for old in ("max_train_samples", "max_eval_samples"):
            if raw.get(old) is not None and not getattr(cfg.data, old):
                setattr(cfg.data, old, int(raw[old]))
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, d: dict) -> "ThinkRecOptions":
        raw = dict(d)
        # YAML 1.1 reads an unquoted yes/no as a boolean: map those back to the words the user wrote.
        for key, word in (("rec_score", "yes"), ("yes_text", "Yes"), ("no_text", "No")):
            if isinstance(raw.get(key), bool):
                raw[key] = word if raw[key] == (key != "no_text") else raw[key]
        if raw.get("projector_mult") is not None and "mid_mult" not in raw:
            raw["mid_mult"] = raw["projector_mult"]  # the pre-0.2 name, mapped here (load_options warns once)
        opt = load_options(cls, raw, "task.options.", deprecated=DEPRECATED)
        opt.validate()
        return opt

    def validate(self) -> None:
        if self.rec_score not in ("yes", "yes_minus_no"):
            raise ConfigError(f"task.options.rec_score={self.rec_score!r}. Fix: use `yes` or `yes_minus_no`")
        for k in ("alpha", "beta", "theta", "gamma"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"task.options.{k}={v!r} must be a number >= 0. Fix: e.g. the default "
                                  f"{getattr(ThinkRecOptions, k)}")
        if not 0 <= self.reason_ratio <= 1:
            raise ConfigError(f"task.options.reason_ratio={self.reason_ratio!r} must be in [0, 1]. Fix: e.g. 0.2")
        for k in ("mid_mult", "proj_token_num"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"task.options.{k}={v!r} must be a positive integer. Fix: e.g. "
                                  f"{getattr(ThinkRecOptions, k)}")
        if self.activation not in PROJECTOR_ACTIVATIONS:
            raise ConfigError(f"task.options.activation={self.activation!r}. Fix: use one of "
                              f"{sorted(PROJECTOR_ACTIVATIONS)} (relu is ThinkRec's)")
        if self.template is None:
            if self.prompt_mode not in prompts.TEMPLATES:
                raise ConfigError(f"task.options.prompt_mode={self.prompt_mode!r}. Fix: use `text` or `ids`")
            self.template = prompts.TEMPLATES[self.prompt_mode]
        prompts.check_template(self.template, self.prompt_mode)
        if self.prompt_mode == "ids" and not self.cf_export:
            raise ConfigError("task.options.prompt_mode=ids needs task.options.cf_export. Fix: pass the folder "
                              "written by `distthink rec train-cf`")
        if self.cf_export:
            check_cf_spec(str(self.cf_export))
        if self.init_adapter and not (Path(self.init_adapter) / "adapter_model.safetensors").is_file():
            raise ConfigError(f"task.options.init_adapter={self.init_adapter!r} has no adapter_model.safetensors. "
                              "Fix: pass the previous stage's export folder (train.output_dir/export)")
        if self.train_projector is None:
            self.train_projector = self.prompt_mode == "ids"
        if self.init_projector:
            if self.prompt_mode != "ids":
                raise ConfigError(f"task.options.init_projector={self.init_projector!r} is set but prompt_mode="
                                  f"{self.prompt_mode!r} uses no projector. Fix: set prompt_mode: ids, or remove "
                                  "init_projector")

            check_projector_export(self.init_projector)
        elif self.prompt_mode == "ids" and not self.train_projector:
            # A frozen projector that nobody trained would inject random vectors into every prompt: refuse.
            raise ConfigError("task.options.prompt_mode=ids with train_projector=false needs a trained projector. "
                              "Fix: set task.options.init_projector to the stage-2 export folder "
                              "(train.output_dir/export holding projector.safetensors), or train_projector: true")
        for k in ("yes_text", "no_text"):
            if not getattr(self, k) or not isinstance(getattr(self, k), str):
                raise ConfigError(f"task.options.{k} must be a non-empty string. Fix: e.g. Yes / No")
        if self.molora is not None:
            self.molora = MoLoRAStage.from_dict(self.molora, cf_export=self.cf_export)
            if self.init_adapter or self.freeze_lora:
                raise ConfigError("task.options.init_adapter/freeze_lora do not apply to stage 3. Fix: name the "
                                  "stage-1 adapter in task.options.molora.init_adapter and remove them")


@dataclass
class MoLoRAStage:
    """``task.options.molora`` (stage 3, docs/thinkrec.md): per-group experts trained in one job.

    groups_dir: folder of `distthink rec group` (user_groups.parquet + centroids). init_adapter: the stage-1
    PEFT adapter folder every expert and the global adapter start from. gate: ``hard`` routes each sample to
    its user's group expert (users absent from the table: the global adapter); ``soft`` uses the entropy gate
    on the CF user vectors (needs task.options.cf_export). tau / expert_margin / entropy_frac / gate_space: the
    entropy gate's settings (distthink/tasks/thinkrec/gate.py), used by ``soft`` training and written to
    molora.json, where `rec eval --fusion` and `rec explain` read them back.
    """

    groups_dir: str = ""
    init_adapter: str = ""
    gate: str = "hard"
    dropout: float = 0.05              # LoRA input dropout of every expert (ThinkRec's LoRA dropout)
    tau: float = 0.1                   # gate: softmax temperature on the cosine similarities
    expert_margin: float = 0.6         # gate: one expert alone when max w > 0.5 + expert_margin / K
    entropy_frac: float = 0.95         # gate: global adapter when H(w) > entropy_frac * ln K (tested first)
    gate_space: str = "raw"            # gate: raw (ThinkRec: CF vector vs raw group means) | standardised

    def gate_config(self) -> GateConfig:
        return GateConfig(tau=self.tau, expert_margin=self.expert_margin, entropy_frac=self.entropy_frac,
                          space=self.gate_space)

    @classmethod
    def from_dict(cls, d, cf_export=None) -> "MoLoRAStage":
        if isinstance(d, MoLoRAStage):
            return d
        if not isinstance(d, dict) and hasattr(d, "items"):
            d = dict(d.items())
        if not isinstance(d, dict):
            raise ConfigError(f"task.options.molora must be a mapping, got {d!r}. Fix: e.g. "
                              "{groups_dir: runs/groups, init_adapter: runs/stage1/export}")
        m = load_options(cls, d, "task.options.molora.")
        g = Path(m.groups_dir) if m.groups_dir else None
        if g is None or not (g / "user_groups.parquet").is_file() or not (g / "groups.safetensors").is_file():
            raise ConfigError(f"task.options.molora.groups_dir={m.groups_dir!r} is not a `distthink rec group` "
                              "folder. Fix: run `distthink rec group --cf CF --out DIR` and pass DIR")
        if not m.init_adapter or not (Path(m.init_adapter) / "adapter_model.safetensors").is_file():
            raise ConfigError(f"task.options.molora.init_adapter={m.init_adapter!r} has no "
                              "adapter_model.safetensors. Fix: pass stage 1's export folder (train.output_dir/export)")
        if m.gate not in ("hard", "soft"):
            raise ConfigError(f"task.options.molora.gate={m.gate!r}. Fix: use `hard` or `soft`")
        if m.gate == "soft" and not cf_export:
            raise ConfigError("task.options.molora.gate=soft needs the CF user vectors. Fix: set "
                              "task.options.cf_export (the `distthink rec train-cf` folder)")
        if isinstance(m.dropout, bool) or not isinstance(m.dropout, (int, float)) or not 0 <= m.dropout < 1:
            raise ConfigError(f"task.options.molora.dropout={m.dropout!r} must be in [0, 1). Fix: e.g. 0.05")
        if m.gate_space not in GATE_SPACES:
            raise ConfigError(f"task.options.molora.gate_space={m.gate_space!r}. Fix: use raw (ThinkRec) or "
                              "standardised")
        m.gate_config().validate("task.options.molora.")
        if m.gate_space == "raw" and "centroids_raw" not in group_tensor_names(g):
            raise ConfigError(f"task.options.molora.groups_dir={m.groups_dir!r} has no raw group means "
                              "(centroids_raw; older `rec group` output). Fix: run `distthink rec group` again, or "
                              "set task.options.molora.gate_space: standardised")
        return m
