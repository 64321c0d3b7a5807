"""The ThinkRec task (``task.name: thinkrec``): Yes/No recommendation + reasoning in one training loop.

Data. ``data.train`` / ``data.eval`` name splits written by ``distthink rec prepare`` (Parquet/JSONL with
``user_id, item_id, label, history_*, target_title, reason?``). Each row becomes one sample, rendered with a
template (distthink/tasks/thinkrec/prompts.py) through the model's chat template by ``encode_chat``:

- a *reasoning* sample answers with the row's ``reason`` ("Yes. because ..." / "No. because ...");
- a *label-only* sample answers "Yes" or "No".

Mixed sampling. Which rows are reasoning samples is drawn once per split at dataset construction:
row i is a reasoning sample iff it has a reason and ``u_i < reason_ratio`` with ``u = default_rng([seed,
split]).random(n)``. Every rank computes the same draw (same seed), so the split is identical across ranks
and launches (distributed-correct, deterministic per seed); the usual samplers then shuffle per epoch. The
draw is *not* redone per epoch (the trainer encodes a split once).

Objectives (keys ``lm`` and ``rec``, each normalised by its own global total, distthink/engine/task.py). With
per-sample mixing weights (reasoning: a_s=alpha, b_s=beta; label-only: a_s=theta, b_s=gamma):

    L_lm  = sum_s b_s * sum_{t in s} w_t * CE_t   /  sum over all samples of the step of sum_t w_t
    L_rec = sum_s a_s * BCE(score_s, y_s)         /  number of samples of the step
    L     = L_lm + L_rec

``score_s`` is the raw logit of the first token of ``yes_text`` (``rec_score: yes``) or that logit minus the
one of ``no_text`` (``rec_score: yes_minus_no``), read at the row whose hidden state predicts the answer's
first token, via the fused loss's ``selected_logits`` (an (R, H) x (H, 2) product: no vocabulary pass). The
normalisers are the *unmixed* totals, so alpha..gamma keep their meaning in any batch composition (a batch of
label-only samples still weighs its LM term by gamma, it is not renormalised back to 1).

Injection (``prompt_mode: ids``). ``<UserID>``, ``<TargetItemID>`` and one ``<ItemID>`` per history item are
added special tokens (always added, so every stage has the same vocabulary). A projector MLP maps the CF
vectors of ``cf_export`` (a ``distthink rec train-cf`` export, ``.npz`` shards or ``inline`` row vectors:
distthink/tasks/thinkrec/cf_source.py) into the embedding space at those rows; per-row vectors (SASRec, DCN,
DIN, inline) come with the batch, tables are looked up by id.
The trained projector is part of the stage's export (``export/projector.safetensors`` + ``projector.json``,
written by ``save_extra``); a later stage reloads it by path with ``init_projector`` (shape-checked). A frozen
projector (``train_projector: false``) without ``init_projector`` is a ConfigError: it would be random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distthink.config import Config
from distthink.data.parallel_encode import SplitEncoding
from distthink.engine import batching as train_data
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.attention import model_inputs
from distthink.models.inject import add_placeholder_tokens
from distthink.models.molora import apply_molora, hard_gate, set_gates
from distthink.models.molora_export import export_molora
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.cf_source import open_cf_source
from distthink.tasks.thinkrec.gate import EntropyGate
from distthink.tasks.thinkrec.grouping import load_groups
from distthink.tasks.thinkrec.model import build_wrapper, side_inputs
from distthink.tasks.thinkrec.options import ThinkRecOptions
from distthink.tasks.thinkrec.projector_export import save_projector_export
from distthink.tasks.thinkrec.samples import ThinkRecCollator, split_encoding

log = get_logger(__name__)


class ThinkRecTask:
    """task.name=thinkrec (see the module docstring)."""

    name = "thinkrec"
    loss_keys: tuple[str, ...] = ("lm", "rec")
    source_options: tuple[str, ...] = ("reason_ratio",)  # per source of a mixture (split_encoding)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.opt = ThinkRecOptions.from_config(cfg)
        self.ph_ids: dict[str, int] = {}

    def prepare_tokenizer(self, tokenizer) -> None:
        self.ph_ids = add_placeholder_tokens(tokenizer, list(prompts.ID_TOKENS))

    def split_encoding(self, split: str, tokenizer, source: str | None = None,
                       source_options: dict | None = None) -> SplitEncoding:
        """source_options (one source of a mixture): `reason_ratio` replaces task.options.reason_ratio for that
        source, e.g. 1.0 for ThinkRec's reasoning set and 0.0 for its recommendation set (docs/thinkrec.md)."""
        spec = source or (self.cfg.data.train if split == "train" else self.cfg.data.eval)
        if not spec or spec == "bundled" or not Path(spec).is_file():
            raise ConfigError(f"data.{split}={spec!r}: thinkrec needs a split written by `distthink rec prepare`. "
                              "Fix: e.g. data.train=PREP/train.parquet data.eval=PREP/valid.parquet")
        limit = train_data.split_limit(self.cfg, split)
        ratio = None if split == "train" else 0.0
        if source_options and "reason_ratio" in source_options:
            ratio = source_options["reason_ratio"]
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"data.train source {spec}: options.reason_ratio={ratio!r} must be a number in "
                                  "[0, 1]. Fix: 1.0 for a reasoning set, 0.0 for a label-only set")
        return split_encoding(tokenizer, spec, self.opt, train_data.chat_policy(self.cfg), seed=self.cfg.train.seed,
                              split=split, limit=limit, reason_ratio=ratio)

    def collator(self, tokenizer):
        return ThinkRecCollator(pad_token_id=tokenizer.pad_token_id or 0, packed=self.cfg.batch.packing)

    def wrap_model(self, model, tokenizer) -> torch.nn.Module:
        if self.opt.molora is not None:
            model = self._apply_molora(model)
        return build_wrapper(model, tokenizer, self.opt, impl=self.cfg.loss.impl, chunk_size=self.cfg.loss.chunk_size)

    def _apply_molora(self, model):
        """Stage 3: swap the targeted linears for MoLoRA layers, every adapter starting from stage 1's."""
        m = self.opt.molora
        if hasattr(model, "peft_config"):
            raise ConfigError("task.options.molora (stage 3) builds its own adapters. Fix: set lora.enabled=false")
        groups = load_groups(m.groups_dir)
        k = int(groups["centroids"].shape[0])
        table = groups["table"]
        n = int(max(table["user_id"].max(), 0)) + 1
        # user id -> group (-1 = not in the table -> global adapter); a lookup tensor, no per-sample dict.
        self.user_group = torch.full((n,), -1, dtype=torch.long)
        self.user_group[torch.as_tensor(table["user_id"].to_numpy(), dtype=torch.long)] = torch.as_tensor(
            table["group"].to_numpy(), dtype=torch.long)
        self.num_experts = k
        self.gate = EntropyGate.from_groups(m.groups_dir, m.gate_config()) if m.gate == "soft" else None
        inner = apply_molora(model, k, dropout=float(m.dropout), init_from_peft_adapter=m.init_adapter)
        self.molora_model = inner
        return inner

    def sample_gates(self, user_ids: torch.Tensor, user_table: torch.Tensor | None = None,
                     user_vecs: torch.Tensor | None = None) -> torch.Tensor:
        """(S,) user ids -> (S, K+1) gates on the CPU: one-hot by group (hard) or the entropy gate on the CF user
        vectors (soft): the user table's rows, or `user_vecs` (S, d) when the source has no table (inline).
        The tables live on the CPU and the ids may come on the accelerator (the batch was moved there): every
        lookup uses the CPU copy of the ids."""
        u = user_ids.detach().cpu().long()
        if self.gate is not None:
            vecs = user_table.detach().cpu()[u] if user_table is not None else user_vecs.detach().cpu()
            return self.gate(vecs.float()).weights
        g = torch.full_like(u, -1)
        known = u < self.user_group.numel()
        g[known] = self.user_group[u[known]]
        return hard_gate(g, self.num_experts)

    def forward(self, wrapped, batch: dict, attn_impl: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.opt.molora is not None:
            # Stage 3. The trainer calls backward *outside* this method, so the gates are set here and stay set
            # until the next micro-batch's forward replaces them (never cleared in between): a backward that
            # recomputes the forward (gradient checkpointing) then sees this micro-batch's gates.

            table = None
            if self.gate is not None:
                # the user table of the CF source (what `rec group` clustered); inline vectors: the row's own
                if not hasattr(self, "_gate_table"):
                    self._gate_table = open_cf_source(self.opt.cf_export).user
                table = self._gate_table
            gates = self.sample_gates(batch["user_ids"], table, batch.get("user_vecs")).to(batch["input_ids"].device)
            set_gates(self.molora_model, gates, segment_ids=batch["segment_ids"])
        kw = model_inputs(batch, attn_impl, dtype=dtype, with_input_ids=False)
        return wrapped(**side_inputs(batch), **kw)

    def save_extra(self, accelerator, wrapped, export_dir) -> None:
        """Collective, all ranks. prompt_mode=ids: the projector as export_dir/projector.safetensors + projector.json
        (save_projector_export). Stage 3: every expert + the global adapter as PEFT folders + molora.json, in
        export_dir/molora (distthink.models.molora_export)."""
        inner = accelerator.unwrap_model(wrapped)
        if getattr(inner, "projector", None) is not None:
            save_projector_export(inner.projector, export_dir, self.opt,
                                  is_main=accelerator.is_main_process)
            accelerator.wait_for_everyone()
        if self.opt.molora is None:
            return

        m = self.opt.molora
        export_molora(accelerator.unwrap_model(wrapped).model, Path(export_dir) / "molora",
                      gate=EntropyGate.from_groups(m.groups_dir, m.gate_config()), groups_dir=m.groups_dir)
        if accelerator.is_main_process:
            _clean_full_export(Path(export_dir))
        accelerator.wait_for_everyone()

    def norms(self, batch: dict) -> dict[str, float]:
        return {"lm": float(batch["target_weight_sum"]), "rec": float(batch["rec_rows"].numel())}


def _clean_full_export(export_dir: Path) -> None:
    """The `full` export of a MoLoRA model holds ``<proj>.base_layer.weight`` and the stacked ``lora_A/lora_B``;
    rewrite it as the plain base model (``<proj>.weight``, no adapters) so transformers loads it and any
    exported adapter applies on top. The adapters themselves live in export_dir/molora."""
    def clean(key: str) -> str | None:
        if key.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            return None
        return key.replace(".base_layer.", ".")

    for f in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata()
            keys = list(fh.keys())
            if not any(clean(k) != k for k in keys):
                continue
            tensors = {clean(k): fh.get_tensor(k) for k in keys if clean(k) is not None}
        save_file(tensors, str(f), metadata=meta)
    idx = export_dir / "model.safetensors.index.json"
    if idx.is_file():
        d = json.loads(idx.read_text())
        d["weight_map"] = {clean(k): v for k, v in d["weight_map"].items() if clean(k) is not None}
        idx.write_text(json.dumps(d, indent=2))
