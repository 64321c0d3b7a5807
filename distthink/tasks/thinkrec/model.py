"""The ThinkRec wrapper: decoder (+ CF-vector injection) on the engine's LM-head loss part -> {"lm", "rec"} sums,
and the recommendation score read from the Yes/No logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from distthink.engine.lm_loss import LMHeadLoss
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.inject import PlaceholderSlot, Projector, inject_placeholders
from distthink.models.load import side_module_dtype
from distthink.tasks.thinkrec import prompts
from distthink.tasks.thinkrec.cf_source import open_cf_source
from distthink.tasks.thinkrec.options import ThinkRecOptions
from distthink.tasks.thinkrec.projector_export import load_projector_export
from distthink.tasks.thinkrec.samples import verdict_ids
from distthink.zero3 import gathered

log = get_logger(__name__)


def rec_bce_sum(scores: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """sum_s coef_s * BCE(sigmoid(score_s), y_s) in fp32. scores/labels/coef (S,)."""
    bce = F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction="none")
    return (bce * coef.float()).sum()


class ThinkRecModel(LMHeadLoss):
    """The module handed to accelerate/DeepSpeed: decoder (+ injection) -> {"lm": sum, "rec": sum}.

    ``model``: the (PEFT-wrapped) causal LM. ``projector``: a Projector or None. ``user_table`` /
    ``item_table``: (n, d) CF vectors (buffers, not trained) or None. ``ph_ids``: {placeholder: token id}.
    The LM loss and the Yes/No logits come from the engine's LM-head loss part (`head_loss`).
    """

    def __init__(self, model, *, yes_id: int, no_id: int, rec_score: str = "yes", impl: str = "fused",
                 chunk_size: int = 1024, projector=None, user_table=None, item_table=None, ph_ids=None):
        super().__init__(model, impl=impl, chunk_size=chunk_size)
        self.projector = projector
        self.yes_id, self.no_id, self.rec_score = yes_id, no_id, rec_score
        self.ph_ids = dict(ph_ids or {})
        if user_table is not None:
            self.register_buffer("user_table", user_table.float(), persistent=False)
            self.register_buffer("item_table", item_table.float(), persistent=False)
        else:
            self.user_table = self.item_table = None

    def embed(self, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts, user_vecs=None,
              target_vecs=None, hist_vecs=None):
        """inputs_embeds (B, T, H) with the projected CF vectors at the id placeholders. A row's vectors are the
        per-row ones when the batch carries them (``*_vecs``: target-aware / history encoders, inline vectors),
        else the table rows of its ids."""
        embeds = self.base.get_input_embeddings()(input_ids)
        ones = torch.ones_like(user_ids)
        slots = [
            PlaceholderSlot(self.ph_ids[prompts.USER_ID], self._projected(user_vecs, self.user_table, user_ids),
                            ones, prompts.USER_ID),
            PlaceholderSlot(self.ph_ids[prompts.TARGET_ITEM_ID],
                            self._projected(target_vecs, self.item_table, target_ids), ones, prompts.TARGET_ITEM_ID),
            PlaceholderSlot(self.ph_ids[prompts.ITEM_ID], self._projected(hist_vecs, self.item_table, hist_ids),
                            hist_counts,
                            prompts.ITEM_ID),
        ]
        inplace = not (embeds.is_leaf and embeds.requires_grad)
        return inject_placeholders(input_ids, embeds, slots, segment_ids=segment_ids,
                                   num_samples=int(user_ids.numel()), inplace=inplace)

    def _projected(self, given: torch.Tensor | None, table: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        """The projector's output for the per-row vectors `given`, else for the table rows of `ids`. The table is read
        where it lives and only the looked-up rows travel to the projector's device and dtype: DeepSpeed ZeRO-3 never
        moves the buffers of a module built outside zero.Init (the table stays on the host while the ids are on the
        GPU), and ZeRO-2 in bf16 casts the projector's weights but not fp32 buffers."""
        w = next(self.projector.parameters())  # under ZeRO-3 partitioned, but its device and dtype are the real ones
        rows = given if given is not None else table[ids.to(table.device)]
        return self.projector(rows.to(device=w.device, dtype=w.dtype))

    def _add_decoder_input(self, model_kwargs: dict, input_ids, segment_ids, user_ids, target_ids, hist_ids,
                           hist_counts, vecs: dict) -> None:
        """The decoder reads `inputs_embeds` with the projected CF vectors injected (id prompts), else `input_ids`."""
        if self.projector is not None:
            model_kwargs["inputs_embeds"] = self.embed(input_ids, segment_ids, user_ids, target_ids, hist_ids,
                                                       hist_counts, **vecs)
        else:
            model_kwargs["input_ids"] = input_ids

    def forward(self, targets, target_weights, lm_mult, rec_rows, rec_labels, rec_coef, input_ids, segment_ids,
                user_ids, target_ids, hist_ids, hist_counts, return_scores: bool = False, user_vecs=None,
                target_vecs=None, hist_vecs=None, **model_kwargs):
        vecs = {"user_vecs": user_vecs, "target_vecs": target_vecs, "hist_vecs": hist_vecs}
        self._add_decoder_input(model_kwargs, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts,
                                vecs)
        lm, selected = self.head_loss(targets, target_weights * lm_mult, model_kwargs, segment_ids=segment_ids,
                                      stats_token_ids=[self.yes_id, self.no_id], stats_rows=rec_rows)
        scores = self._score_from(selected)
        out = {"lm": lm, "rec": rec_bce_sum(scores, rec_labels, rec_coef)}
        if return_scores:
            out["scores"] = scores.detach()
        return out

    def _score_from(self, sel: torch.Tensor) -> torch.Tensor:
        """(S, 2) Yes/No logits -> (S,) score per `rec_score`."""
        return sel[:, 0] - sel[:, 1] if self.rec_score == "yes_minus_no" else sel[:, 0]

    @torch.no_grad()
    def score(self, rec_rows, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts, user_vecs=None,
              target_vecs=None, hist_vecs=None, **model_kwargs) -> torch.Tensor:
        """Evaluation: the (S,) recommendation scores only. The decoder runs once and only the answer rows meet
        the two verdict rows of the LM head ((S, H) x (H, 2)): no vocabulary-wide logits, no LM loss (at a
        150k vocabulary the logits of a batch would be the whole cost). Equal to forward(...)["scores"]."""
        vecs = {"user_vecs": user_vecs, "target_vecs": target_vecs, "hist_vecs": hist_vecs}
        self._add_decoder_input(model_kwargs, input_ids, segment_ids, user_ids, target_ids, hist_ids, hist_counts,
                                vecs)
        hidden = self.hidden_states(**model_kwargs)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rec_rows)
        head = self.base.lm_head
        sel = F.linear(rows, head.weight[[self.yes_id, self.no_id]].to(rows.dtype),
                       None if head.bias is None else head.bias[[self.yes_id, self.no_id]].to(rows.dtype))
        return self._score_from(sel.float())


SIDE_KEYS = ("targets", "target_weights", "lm_mult", "rec_rows", "rec_labels", "rec_coef", "input_ids",
             "segment_ids", "user_ids", "target_ids", "hist_ids", "hist_counts")
#: the batch keys ThinkRecModel.score reads (besides the decoder's own inputs)
SCORE_KEYS = ("rec_rows", "input_ids", "segment_ids", "user_ids", "target_ids", "hist_ids", "hist_counts")
#: per-row CF vectors, in a batch only when its samples carry them (ThinkRecCollator)
ROW_VECTOR_KEYS = ("user_vecs", "target_vecs", "hist_vecs")


def side_inputs(batch: dict, keys=SIDE_KEYS) -> dict:
    """The wrapper's keyword inputs from a collated batch: `keys` + the per-row vectors it holds."""
    return {**{k: batch[k] for k in keys}, **{k: batch[k] for k in ROW_VECTOR_KEYS if k in batch}}



def build_wrapper(model, tokenizer, opt: ThinkRecOptions, *, impl: str = "fused", chunk_size: int = 1024):
    """ThinkRecModel around `model`: loads/freeze the previous stage's adapter, builds the projector."""
    ph_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in prompts.ID_TOKENS}
    if opt.init_adapter:
        _load_adapter(model, opt.init_adapter)
    if opt.freeze_lora:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)
    projector = user = item = None
    if opt.prompt_mode == "ids":
        cf = open_cf_source(opt.cf_export)
        user, item = cf.user, cf.item
        if not cf.dim:
            raise ConfigError("task.options.cf_export=inline: the vector size is known once the split is read. Fix: "
                              "load the split (task.load_split / build_samples) before building the wrapper")
        hidden = model.config.hidden_size if hasattr(model, "config") else model.get_input_embeddings().embedding_dim
        torch.manual_seed(0)  # the same projector init on every rank
        projector = Projector(cf.dim, hidden, mult=opt.mid_mult, k=opt.proj_token_num, activation=opt.activation)
        if opt.init_projector:
            load_projector_export(projector, opt.init_projector, opt, cf=cf)
        projector.requires_grad_(bool(opt.train_projector))
        projector.to(side_module_dtype(model))  # after freezing the adapter: a frozen LM leaves fp32
    yes_id, no_id = verdict_ids(tokenizer, opt)
    return ThinkRecModel(model, yes_id=yes_id, no_id=no_id, rec_score=opt.rec_score, impl=impl, chunk_size=chunk_size,
                         projector=projector, user_table=user, item_table=item, ph_ids=ph_ids)


def _load_adapter(model, path: str) -> None:
    """Load a PEFT adapter export into the (already LoRA-wrapped) model, gathering under ZeRO-3."""

    if not hasattr(model, "peft_config"):
        raise ConfigError("task.options.init_adapter needs lora.enabled=true (the adapter loads into LoRA layers)")
    sd = load_file(str(Path(path) / "adapter_model.safetensors"))
    with gathered(model.parameters(), modifier_rank=0):
        res = set_peft_model_state_dict(model, sd)
    missing = [k for k in getattr(res, "unexpected_keys", []) or []]
    if missing:
        raise ConfigError(f"task.options.init_adapter={path}: keys {missing[:3]} do not fit this model. Fix: use the "
                          "same model and lora.r/target_modules as the previous stage")
    log.info("loaded adapter %s (%d tensors)", path, len(sd))
