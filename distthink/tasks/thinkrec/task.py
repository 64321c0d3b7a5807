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
vectors of a ``distthink rec train-cf`` export (``cf_export``) into the embedding space at those rows.
The trained projector is part of the stage's export (``export/projector.safetensors`` + ``projector.json``,
written by ``save_extra``); a later stage reloads it by path with ``init_projector`` (shape-checked). A frozen
projector (``train_projector: false``) without ``init_projector`` is a ConfigError: it would be random.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distthink.config import Config
from distthink.errors import ConfigError, DataError
from distthink.logging_utils import get_logger
from distthink.tasks.thinkrec import prompts

log = get_logger(__name__)

SPLIT_SEED = {"train": 0, "eval": 1, "test": 2}


@dataclass
class ThinkRecOptions:
    """``task.options`` of the thinkrec task (docs/thinkrec.md)."""

    prompt_mode: str = "text"          # text (stage 1) | ids (stage 2/3: id tokens + projector)
    template: str | None = None        # None = prompts.TEMPLATES[prompt_mode]
    cf_export: str | None = None       # folder of `distthink rec train-cf` (needed for prompt_mode=ids)
    rec_score: str = "yes"             # yes | yes_minus_no
    yes_text: str = "Yes"
    no_text: str = "No"
    alpha: float = 0.1                 # reasoning samples: alpha * BCE + beta * LM
    beta: float = 0.9
    theta: float = 0.9                 # label-only samples: theta * BCE + gamma * LM
    gamma: float = 0.1
    reason_ratio: float = 0.2          # share of rows (with a reason) used as reasoning samples
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    projector_mult: int = 10
    proj_token_num: int = 1
    train_projector: bool | None = None  # default: prompt_mode == ids
    init_projector: str | None = None  # a stage-2 export folder holding projector.safetensors (loaded by path)
    init_adapter: str | None = None    # a previous stage's adapter export folder (loaded by path)
    freeze_lora: bool = False          # stage 2: LoRA frozen
    molora: dict | None = None         # stage 3: {groups_dir, init_adapter, gate: hard|soft, dropout} (MoLoRAStage)

    @classmethod
    def from_dict(cls, d: dict) -> "ThinkRecOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"task.options: unknown key(s) {unknown} for task thinkrec. Fix: use {sorted(names)}")
        opt = cls(**d)
        opt.validate()
        return opt

    def validate(self) -> None:
        # YAML 1.1 reads an unquoted yes/no as a boolean: map those back to the words the user wrote.
        if self.rec_score is True:
            self.rec_score = "yes"
        if self.yes_text is True:
            self.yes_text = "Yes"
        if self.no_text is False:
            self.no_text = "No"
        if self.rec_score not in ("yes", "yes_minus_no"):
            raise ConfigError(f"task.options.rec_score={self.rec_score!r}. Fix: use `yes` or `yes_minus_no`")
        for k in ("alpha", "beta", "theta", "gamma"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"task.options.{k}={v!r} must be a number >= 0. Fix: e.g. the default "
                                  f"{getattr(ThinkRecOptions, k)}")
        if not 0 <= self.reason_ratio <= 1:
            raise ConfigError(f"task.options.reason_ratio={self.reason_ratio!r} must be in [0, 1]. Fix: e.g. 0.2")
        for k in ("projector_mult", "proj_token_num"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ConfigError(f"task.options.{k} must be a positive integer. Fix: e.g. 10 / 1")
        if self.template is None:
            if self.prompt_mode not in prompts.TEMPLATES:
                raise ConfigError(f"task.options.prompt_mode={self.prompt_mode!r}. Fix: use `text` or `ids`")
            self.template = prompts.TEMPLATES[self.prompt_mode]
        prompts.check_template(self.template, self.prompt_mode)
        if self.prompt_mode == "ids" and not self.cf_export:
            raise ConfigError("task.options.prompt_mode=ids needs task.options.cf_export. Fix: pass the folder "
                              "written by `distthink rec train-cf`")
        if self.cf_export and not Path(self.cf_export).is_dir():
            raise ConfigError(f"task.options.cf_export={self.cf_export!r} is not a folder. Fix: run "
                              "`distthink rec train-cf --out DIR` and pass DIR")
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
            from distthink.tasks.thinkrec.projector_export import check_projector_export

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
    on the CF user vectors (needs task.options.cf_export).
    """

    groups_dir: str = ""
    init_adapter: str = ""
    gate: str = "hard"
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, d, cf_export=None) -> "MoLoRAStage":
        if isinstance(d, MoLoRAStage):
            return d
        if not isinstance(d, dict) and hasattr(d, "items"):
            d = dict(d.items())
        if not isinstance(d, dict):
            raise ConfigError(f"task.options.molora must be a mapping, got {d!r}. Fix: e.g. "
                              "{groups_dir: runs/groups, init_adapter: runs/stage1/export}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"task.options.molora: unknown key(s) {unknown}. Fix: use {sorted(names)}")
        m = cls(**d)
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
            raise ConfigError(f"task.options.molora.dropout={m.dropout!r} must be in [0, 1). Fix: e.g. 0.0")
        return m


def verdict_ids(tokenizer, opt: ThinkRecOptions) -> tuple[int, int]:
    """First token id of yes_text and of no_text (distinct, else ConfigError)."""
    y = tokenizer.encode(opt.yes_text, add_special_tokens=False)
    n = tokenizer.encode(opt.no_text, add_special_tokens=False)
    if not y or not n or y[0] == n[0]:
        raise ConfigError(f"the first tokens of yes_text={opt.yes_text!r} ({y[:1]}) and no_text={opt.no_text!r} "
                          f"({n[:1]}) must exist and differ. Fix: choose other verdict words")
    return int(y[0]), int(n[0])


def _encode_row(tokenizer, row: dict, opt: ThinkRecOptions, policy, reasoning: bool, ids: dict, yes_no,
                source: str, line: int):
    from distthink.data.chat import encode_chat

    label = int(row["label"])
    answer = str(row["reason"]).strip() if reasoning else (opt.yes_text if label else opt.no_text)
    want = opt.yes_text if label else opt.no_text
    if not answer.startswith(want):
        raise DataError(f"the reason does not start with the verdict {want!r}: {answer[:40]!r}", source=source,
                        line=line, field="reason", fix="store reasons as 'Yes. because ...' / 'No. because ...'")
    r = prompts.render(row, template=opt.template, mode=opt.prompt_mode, answer=answer, source=source, line=line)
    if opt.proj_token_num > 1:  # k tokens per id: repeat every id token k times
        for tok in prompts.ID_TOKENS:
            r.messages[0]["content"] = r.messages[0]["content"].replace(tok, tok * opt.proj_token_num)
    s = encode_chat(tokenizer, r.messages, policy=policy, source=source, line=line)
    if isinstance(s, list):
        raise ConfigError("data.policy.expand_turns must be false for thinkrec. Fix: remove it")
    arr = np.asarray(s.input_ids)
    learned = np.nonzero(np.asarray(s.labels) != -100)[0]
    vid = yes_no[0] if label else yes_no[1]
    hits = learned[np.isin(arr[learned], yes_no)]
    if not hits.size or arr[hits[0]] != vid or hits[0] == 0:
        raise DataError("the answer's verdict token is not in the encoded sample (truncated, or the tokenizer "
                        "merges it with the text before it)", source=source, line=line, field="label",
                        fix="raise data.max_length, or set task.options.yes_text/no_text")
    k = opt.proj_token_num
    expect = {ids[prompts.USER_ID]: k if opt.prompt_mode == "ids" else 0,
              ids[prompts.TARGET_ITEM_ID]: k if opt.prompt_mode == "ids" else 0,
              ids[prompts.ITEM_ID]: k * len(r.history_ids)}
    for tid, n in expect.items():
        found = int((arr == tid).sum())
        if found != n:
            raise DataError(f"sample has {found} placeholder token(s) id {tid} but {n} are needed (truncated?)",
                            source=source, line=line, field="history_item_ids",
                            fix="raise data.max_length or shorten the history")
    s.meta.update(rec_type="reasoning" if reasoning else "label", label=label, user_id=r.user_id,
                  item_id=r.item_id, history_ids=r.history_ids, answer_row=int(hits[0]) - 1,
                  lm_mult=float(opt.beta if reasoning else opt.gamma),
                  rec_coef=float(opt.alpha if reasoning else opt.theta), index=line - 1)
    return s


def build_samples(tokenizer, path: str | Path, opt: ThinkRecOptions, policy, *, seed: int, split: str,
                  reason_ratio: float | None = None, limit: int | None = None) -> list:
    """Encode a prepared split into EncodedSamples with ThinkRec meta (see the module docstring)."""
    from distthink.tasks.thinkrec.prepare import read_split

    df = read_split(path)
    if limit is not None:
        df = df.iloc[:limit]
    ratio = opt.reason_ratio if reason_ratio is None else reason_ratio
    has_reason = (df["reason"].fillna("").astype(str).str.strip() != "").to_numpy() if "reason" in df else \
        np.zeros(len(df), dtype=bool)
    u = np.random.default_rng([seed, SPLIT_SEED.get(split, 3)]).random(len(df))
    reasoning = has_reason & (u < ratio)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    yes_no = verdict_ids(tokenizer, opt)
    rows = df.to_dict("records")
    out = [_encode_row(tokenizer, row, opt, policy, bool(reasoning[i]), ids, yes_no, str(path), i + 1)
           for i, row in enumerate(rows)]
    log.info("thinkrec %s split %s: %d samples (%d reasoning, %d label-only)", split, path, len(out),
             int(reasoning.sum()), len(out) - int(reasoning.sum()))
    return out


class ThinkRecCollator:
    """PackingCollator output + ThinkRec side inputs:

    - ``lm_mult`` (B, T) float: the sample's LM mixing weight (beta/gamma) on each of its tokens, 0 on padding;
    - ``rec_rows`` (S,) long: flat index (into B*T) of the row predicting each sample's verdict token;
    - ``rec_labels`` (S,) float, ``rec_coef`` (S,) float (alpha/theta), ``sample_index`` (S,) long;
    - ``user_ids`` (S,), ``target_ids`` (S,), ``hist_ids`` (sum of history lengths,), ``hist_counts`` (S,) long.
    """

    def __init__(self, pad_token_id: int, packed: bool = True):
        from distthink.data.packing import PackingCollator

        self.base = PackingCollator(pad_token_id=pad_token_id, packed=packed)
        self.packed = packed

    def __call__(self, samples) -> dict[str, Any]:
        batch = self.base(samples)
        metas = [s.meta for s in samples]
        lengths = np.array([len(s) for s in samples])
        T = batch["input_ids"].shape[1]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if self.packed else np.arange(len(samples)) * T
        seg = batch["segment_ids"]
        mult = torch.tensor([m["lm_mult"] for m in metas] + [0.0], dtype=torch.float32)
        batch["lm_mult"] = mult[torch.where(seg >= 0, seg, torch.full_like(seg, len(metas)))]
        batch["rec_rows"] = torch.tensor(starts + np.array([m["answer_row"] for m in metas]), dtype=torch.long)
        batch["rec_labels"] = torch.tensor([m["label"] for m in metas], dtype=torch.float32)
        batch["rec_coef"] = torch.tensor([m["rec_coef"] for m in metas], dtype=torch.float32)
        batch["sample_index"] = torch.tensor([m["index"] for m in metas], dtype=torch.long)
        batch["user_ids"] = torch.tensor([m["user_id"] for m in metas], dtype=torch.long)
        batch["target_ids"] = torch.tensor([m["item_id"] for m in metas], dtype=torch.long)
        batch["hist_ids"] = torch.tensor([i for m in metas for i in m["history_ids"]], dtype=torch.long)
        batch["hist_counts"] = torch.tensor([len(m["history_ids"]) for m in metas], dtype=torch.long)
        return batch


def rec_bce_sum(scores: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_s coef_s * BCE(sigmoid(score_s), y_s) in fp32. scores/labels/coef (S,)."""
    bce = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction="none")
    return (bce * coef.float()).sum()


class ThinkRecModel(torch.nn.Module):
    """The module handed to accelerate/DeepSpeed: decoder (+ injection) -> {"lm": sum, "rec": sum}.

    ``model``: the (PEFT-wrapped) causal LM. ``projector``: a Projector or None. ``user_table`` /
    ``item_table``: (n, d) CF vectors (buffers, not trained) or None. ``ph_ids``: {placeholder: token id}.
    """

    def __init__(self, model, *, yes_id: int, no_id: int, rec_score: str = "yes", impl: str = "fused",
                 chunk_size: int = 1024, projector=None, user_table=None, item_table=None, ph_ids=None):
        super().__init__()
        from distthink.models.load import base_causal_lm, is_partitioned

        self.model = model
        self.projector = projector
        self.yes_id, self.no_id, self.rec_score = yes_id, no_id, rec_score
        self.impl, self.chunk_size = impl, chunk_size
        self.ph_ids = dict(ph_ids or {})
        if user_table is not None:
            self.register_buffer("user_table", user_table.float(), persistent=False)
            self.register_buffer("item_table", item_table.float(), persistent=False)
        else:
            self.user_table = self.item_table = None
        self._base = [base_causal_lm(model)]
        self._partitioned = is_partitioned(model)
        if impl == "fused" and self._partitioned:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self._base[0].lm_head.weight)

    def embed(self, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts):
        """inputs_embeds (B, T, H) with the projected CF vectors at the id placeholders."""
        from distthink.models.inject import PlaceholderSlot, inject_placeholders

        base = self._base[0]
        embeds = base.get_input_embeddings()(input_ids)
        ones = torch.ones_like(user_ids)
        p = self.projector
        slots = [
            PlaceholderSlot(self.ph_ids[prompts.USER_ID], p(self.user_table[user_ids]), ones, prompts.USER_ID),
            PlaceholderSlot(self.ph_ids[prompts.TARGET_ITEM_ID], p(self.item_table[target_ids]), ones,
                            prompts.TARGET_ITEM_ID),
            PlaceholderSlot(self.ph_ids[prompts.ITEM_ID], p(self.item_table[hist_ids]), hist_counts, prompts.ITEM_ID),
        ]
        inplace = not (embeds.is_leaf and embeds.requires_grad)
        return inject_placeholders(input_ids, embeds, slots, segment_ids=segment_ids,
                                   num_samples=int(user_ids.numel()), inplace=inplace)

    def _add_decoder_input(self, model_kwargs: dict, input_ids, segment_ids, user_ids, target_ids, hist_ids,
                           hist_counts) -> None:
        """The decoder reads `inputs_embeds` with the projected CF vectors injected (id prompts), else `input_ids`."""
        if self.projector is not None:
            model_kwargs["inputs_embeds"] = self.embed(input_ids, segment_ids, user_ids, target_ids, hist_ids,
                                                       hist_counts)
        else:
            model_kwargs["input_ids"] = input_ids

    def forward(self, targets, target_weights, lm_mult, rec_rows, rec_labels, rec_coef, input_ids, segment_ids,
                user_ids, target_ids, hist_ids, hist_counts, return_scores: bool = False, **model_kwargs):
        base = self._base[0]
        self._add_decoder_input(model_kwargs, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts)
        flat_t = targets.reshape(-1)
        flat_w = (target_weights * lm_mult).reshape(-1)
        ids = [self.yes_id, self.no_id]
        if self.impl == "hf":
            logits = self.model(**model_kwargs).logits
            flat = logits.reshape(-1, logits.shape[-1])
            from distthink.engine.lm_loss import weighted_ce_sum

            lm = weighted_ce_sum(flat, flat_t, flat_w)
            sel = flat.index_select(0, rec_rows)[:, ids].float()
        else:
            from distthink.ops import fused_linear_cross_entropy

            hidden = base.model(**model_kwargs).last_hidden_state
            weight = base.lm_head.weight
            if weight.dtype != hidden.dtype:
                weight = weight.to(hidden.dtype)
            lm, stats = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat_t,
                                                   bias=base.lm_head.bias, token_weights=flat_w, reduction="sum",
                                                   chunk_size=self.chunk_size, return_stats=True,
                                                   stats_token_ids=ids, stats_rows=rec_rows)
            sel = stats.selected_logits
        scores = self._score_from(sel)
        out = {"lm": lm, "rec": rec_bce_sum(scores, rec_labels, rec_coef)}
        if return_scores:
            out["scores"] = scores.detach()
        return out

    def _score_from(self, sel: torch.Tensor) -> torch.Tensor:
        """(S, 2) Yes/No logits -> (S,) score per `rec_score`."""
        return sel[:, 0] - sel[:, 1] if self.rec_score == "yes_minus_no" else sel[:, 0]

    @torch.no_grad()
    def score(self, rec_rows, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts,
              **model_kwargs) -> torch.Tensor:
        """Evaluation: the (S,) recommendation scores only. The decoder runs once and only the answer rows meet
        the two verdict rows of the LM head ((S, H) x (H, 2)): no vocabulary-wide logits, no LM loss (at a
        150k vocabulary the logits of a batch would be the whole cost). Equal to forward(...)["scores"]."""
        base = self._base[0]
        self._add_decoder_input(model_kwargs, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts)
        hidden = base.model(**model_kwargs).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rec_rows)
        head = base.lm_head
        sel = F.linear(rows, head.weight[[self.yes_id, self.no_id]].to(rows.dtype),
                       None if head.bias is None else head.bias[[self.yes_id, self.no_id]].to(rows.dtype))
        return self._score_from(sel.float())


SIDE_KEYS = ("targets", "target_weights", "lm_mult", "rec_rows", "rec_labels", "rec_coef", "input_ids",
             "segment_ids", "user_ids", "target_ids", "hist_ids", "hist_counts")
#: the batch keys ThinkRecModel.score reads (besides the decoder's own inputs)
SCORE_KEYS = ("rec_rows", "input_ids", "segment_ids", "user_ids", "target_ids", "hist_ids", "hist_counts")


class ThinkRecTask:
    """task.name=thinkrec (see the module docstring)."""

    name = "thinkrec"
    loss_keys: tuple[str, ...] = ("lm", "rec")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.opt = ThinkRecOptions.from_dict(dict(cfg.task.options))
        self.ph_ids: dict[str, int] = {}

    def prepare_tokenizer(self, tokenizer) -> None:
        from distthink.models.inject import add_placeholder_tokens

        self.ph_ids = add_placeholder_tokens(tokenizer, list(prompts.ID_TOKENS))

    def load_split(self, split: str, tokenizer) -> list:
        from distthink.engine import batching as train_data

        spec = self.cfg.data.train if split == "train" else self.cfg.data.eval
        if not spec or spec == "bundled" or not Path(spec).is_file():
            raise ConfigError(f"data.{split}={spec!r}: thinkrec needs a split written by `distthink rec prepare`. "
                              "Fix: e.g. data.train=PREP/train.parquet data.eval=PREP/valid.parquet")
        limit = self.opt.max_train_samples if split == "train" else self.opt.max_eval_samples
        return build_samples(tokenizer, spec, self.opt, train_data.chat_policy(self.cfg), seed=self.cfg.train.seed,
                             split=split, limit=limit, reason_ratio=None if split == "train" else 0.0)

    def collator(self, tokenizer):
        return ThinkRecCollator(pad_token_id=tokenizer.pad_token_id or 0, packed=self.cfg.batch.packing)

    def wrap_model(self, model, tokenizer) -> torch.nn.Module:
        if self.opt.molora is not None:
            model = self._apply_molora(model)
        return build_wrapper(model, tokenizer, self.opt, impl=self.cfg.loss.impl, chunk_size=self.cfg.loss.chunk_size)

    def _apply_molora(self, model):
        """Stage 3: swap the targeted linears for MoLoRA layers, every adapter starting from stage 1's."""
        from distthink.models.molora import EntropyGate, apply_molora
        from distthink.tasks.thinkrec.grouping import load_groups

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
        self.gate = EntropyGate.from_groups(m.groups_dir) if m.gate == "soft" else None
        inner = apply_molora(model, k, dropout=float(m.dropout), init_from_peft_adapter=m.init_adapter)
        self.molora_model = inner
        return inner

    def sample_gates(self, user_ids: torch.Tensor, user_table: torch.Tensor | None = None) -> torch.Tensor:
        """(S,) user ids -> (S, K+1) gates: one-hot by group (hard) or the entropy gate on CF vectors (soft)."""
        from distthink.models.molora import hard_gate

        u = user_ids.detach().cpu().long()
        if self.gate is not None:
            return self.gate(user_table[user_ids].detach().float().cpu()).weights
        g = torch.full_like(u, -1)
        known = u < self.user_group.numel()
        g[known] = self.user_group[u[known]]
        return hard_gate(g, self.num_experts)

    def forward(self, wrapped, batch: dict, attn_impl: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from distthink.data.packing import model_inputs

        if self.opt.molora is not None:
            # Stage 3. The trainer calls backward *outside* this method, so the gates are set here and stay set
            # until the next micro-batch's forward replaces them (never cleared in between): a backward that
            # recomputes the forward (gradient checkpointing) then sees this micro-batch's gates.
            from distthink.models.molora import set_gates

            table = None
            if self.gate is not None:
                from distthink.tasks.thinkrec.cf import load_cf_export

                if getattr(self, "_cf_user", None) is None:
                    self._cf_user = load_cf_export(self.opt.cf_export).user
                table = self._cf_user
            gates = self.sample_gates(batch["user_ids"], table).to(batch["input_ids"].device)
            set_gates(self.molora_model, gates, segment_ids=batch["segment_ids"])
        kw = model_inputs(batch, attn_impl, dtype=dtype, with_input_ids=False)
        return wrapped(**{k: batch[k] for k in SIDE_KEYS}, **kw)

    def save_extra(self, accelerator, wrapped, export_dir) -> None:
        """Collective, all ranks. prompt_mode=ids: the projector as export_dir/projector.safetensors + projector.json
        (save_projector_export). Stage 3: every expert + the global adapter as PEFT folders + molora.json, in
        export_dir/molora (distthink.models.molora_export)."""
        inner = accelerator.unwrap_model(wrapped)
        if getattr(inner, "projector", None) is not None:
            from distthink.tasks.thinkrec.projector_export import save_projector_export

            save_projector_export(inner.projector, export_dir, self.opt,
                                  is_main=accelerator.is_main_process)
            accelerator.wait_for_everyone()
        if self.opt.molora is None:
            return
        from distthink.models.molora import EntropyGate
        from distthink.models.molora_export import export_molora

        m = self.opt.molora
        export_molora(accelerator.unwrap_model(wrapped).model, Path(export_dir) / "molora",
                      gate=EntropyGate.from_groups(m.groups_dir), groups_dir=m.groups_dir)
        if accelerator.is_main_process:
            _clean_full_export(Path(export_dir))
        accelerator.wait_for_everyone()

    def norms(self, batch: dict) -> dict[str, float]:
        return {"lm": float(batch["target_weight_sum"]), "rec": float(batch["rec_rows"].numel())}


def _clean_full_export(export_dir: Path) -> None:
    """The `full` export of a MoLoRA model holds ``<proj>.base_layer.weight`` and the stacked ``lora_A/lora_B``;
    rewrite it as the plain base model (``<proj>.weight``, no adapters) so transformers loads it and any
    exported adapter applies on top. The adapters themselves live in export_dir/molora."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

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



def build_wrapper(model, tokenizer, opt: ThinkRecOptions, *, impl: str = "fused", chunk_size: int = 1024):
    """ThinkRecModel around `model`: loads/freeze the previous stage's adapter, builds the projector."""
    from distthink.models.inject import Projector

    ph_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    if opt.init_adapter:
        _load_adapter(model, opt.init_adapter)
    if opt.freeze_lora:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)
    projector = user = item = None
    if opt.prompt_mode == "ids":
        from distthink.tasks.thinkrec.cf import load_cf_export

        cf = load_cf_export(opt.cf_export)
        user, item = cf.user, cf.item
        hidden = model.config.hidden_size if hasattr(model, "config") else model.get_input_embeddings().embedding_dim
        torch.manual_seed(0)  # the same projector init on every rank
        projector = Projector(cf.meta["dim"], hidden, mult=opt.projector_mult, k=opt.proj_token_num)
        if opt.init_projector:
            from distthink.tasks.thinkrec.projector_export import load_projector_export

            load_projector_export(projector, opt.init_projector, opt, cf=cf)
        projector.requires_grad_(bool(opt.train_projector))
    yes_id, no_id = verdict_ids(tokenizer, opt)
    return ThinkRecModel(model, yes_id=yes_id, no_id=no_id, rec_score=opt.rec_score, impl=impl, chunk_size=chunk_size,
                         projector=projector, user_table=user, item_table=item, ph_ids=ph_ids)


def _load_adapter(model, path: str) -> None:
    """Load a PEFT adapter export into the (already LoRA-wrapped) model, gathering under ZeRO-3."""
    import contextlib

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from distthink.models.load import is_partitioned

    if not hasattr(model, "peft_config"):
        raise ConfigError("task.options.init_adapter needs lora.enabled=true (the adapter loads into LoRA layers)")
    sd = load_file(str(Path(path) / "adapter_model.safetensors"))
    ctx = contextlib.nullcontext()
    if is_partitioned(model):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)
    with ctx:
        res = set_peft_model_state_dict(model, sd)
    missing = [k for k in getattr(res, "unexpected_keys", []) or []]
    if missing:
        raise ConfigError(f"task.options.init_adapter={path}: keys {missing[:3]} do not fit this model. Fix: use the "
                          "same model and lora.r/target_modules as the previous stage")
    log.info("loaded adapter %s (%d tensors)", path, len(sd))

