"""Score a ThinkRec model on a prepared split: AUC/UAUC + HR/NDCG/MAP@k, per-sample scores to Parquet.

The score of a sample is what the training objective reads: the raw logit of the first token of
``yes_text`` (or the Yes-No margin with ``rec_score: yes_minus_no``) at the row that predicts the answer's
first token of a label-only prompt. Samples are split across ranks (rank r takes r, r+W, ...), gathered,
de-duplicated and counted against the split size (distthink.recsys.metrics.distributed_metrics), so the
figures are exact whatever the number of ranks.

Loading. ``export`` is a stage's adapter export (``train.output_dir/export``). With a from-config base
(the tiny demo model) the export ships the base weights in ``export/base_model``; otherwise the base is
``model.name_or_path`` of the config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distthink.config import Config
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


def load_for_eval(cfg: Config, export: str | None, tokenizer):
    """The causal LM (with the export's adapter when given), eval mode, fp32 on CPU / cfg dtype elsewhere."""
    from transformers import AutoModelForCausalLM

    from distthink.models.load import attn_implementation, build_model_config

    attn = attn_implementation(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    base_dir = Path(export) / "base_model" if export else None
    if export and not (Path(export) / "adapter_config.json").is_file() and (Path(export) / "config.json").is_file():
        # a full-model export (checkpoint.export=full)
        return AutoModelForCausalLM.from_pretrained(str(export), attn_implementation=attn, dtype=torch.float32).eval()
    if base_dir is not None and base_dir.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation=attn, dtype=torch.float32)
    elif cfg.model.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, attn_implementation=attn)
    else:
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_config(build_model_config(cfg, tokenizer), attn_implementation=attn)
        log.warning("no base weights found: scoring a randomly initialised %s", cfg.model.from_config)
    if export:
        if not (Path(export) / "adapter_config.json").is_file():
            raise ConfigError(f"--export {export} is not a PEFT adapter export. Fix: pass train.output_dir/export "
                              "of a run with checkpoint.export=adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, export)
    return model.eval()


@torch.no_grad()
def score_split(cfg: Config, split_path: str, *, export: str | None = None, limit: int | None = None,
                batch_size: int = 8, rank: int = 0, world: int = 1, projector: str | None = None):
    """Scores of this rank's share of the split. Returns (sample_index, users, items, labels, scores) arrays
    of this rank and the split size."""
    from distthink import train_data
    from distthink.data.packing import model_inputs
    from distthink.models.load import load_tokenizer
    from distthink.recsys.task import SIDE_KEYS, ThinkRecTask, build_samples, build_wrapper

    task = ThinkRecTask(cfg)
    if task.opt.prompt_mode == "ids" and not projector:
        raise ConfigError("rec eval of a prompt_mode=ids stage needs the trained projector, which the trainer's export "
                          "does not hold. Fix: pass --projector CHECKPOINT/model.safetensors (a checkpoint of the "
                          "stage; ZeRO-3 checkpoints must be consolidated first with DeepSpeed's zero_to_fp32)")
    tokenizer = load_tokenizer(cfg)
    task.prepare_tokenizer(tokenizer)
    samples = build_samples(tokenizer, split_path, task.opt, train_data.chat_policy(cfg), seed=cfg.train.seed,
                            split="test", reason_ratio=0.0, limit=limit)
    model = load_for_eval(cfg, export, tokenizer)
    opt = task.opt
    opt.init_adapter, opt.freeze_lora = None, False  # the export already holds the adapter
    wrapper = build_wrapper(model, tokenizer, opt, impl="hf").eval()
    if opt.prompt_mode == "ids":
        load_projector(wrapper, projector)
    collate = task.collator(tokenizer)
    mine = list(range(rank, len(samples), world))
    attn = model.config._attn_implementation if hasattr(model, "config") else "sdpa"
    out = {"idx": [], "user": [], "item": [], "label": [], "score": []}
    for i in range(0, len(mine), batch_size):
        part = [samples[j] for j in mine[i:i + batch_size]]
        batch = collate(part)
        res = wrapper(**{k: batch[k] for k in SIDE_KEYS}, **model_inputs(batch, attn, with_input_ids=False),
                      return_scores=True)
        out["idx"] += [s.meta["index"] for s in part]
        out["user"] += [s.meta["user_id"] for s in part]
        out["item"] += [s.meta["item_id"] for s in part]
        out["label"] += [s.meta["label"] for s in part]
        out["score"] += res["scores"].double().tolist()
    return {k: np.asarray(v) for k, v in out.items()}, len(samples)


def load_projector(wrapper, path: str) -> None:
    """Load the `projector.*` tensors of a (non-ZeRO-3 or consolidated) training checkpoint's safetensors."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"--projector {path} is not a file. Fix: pass CHECKPOINT/model.safetensors")
    sd = {k[len("projector."):]: v for k, v in load_file(str(path)).items() if k.startswith("projector.")}
    if not sd:
        raise ConfigError(f"--projector {path} holds no projector.* tensors. Fix: pass a checkpoint of a "
                          "prompt_mode=ids stage")
    try:
        wrapper.projector.load_state_dict(sd)
    except RuntimeError as err:
        raise ConfigError(f"--projector {path} does not fit this config ({err}). Fix: use the stage's config") from None


def evaluate(cfg: Config, split_path: str, *, export: str | None = None, limit: int | None = None,
             scores_out: str | None = None, batch_size: int = 8, ks=(1, 5, 10), projector: str | None = None) -> dict:
    """Collective when a process group is initialised. Metrics dict (same on every rank); rank 0 writes Parquet."""
    import torch.distributed as dist

    from distthink.recsys.metrics import gather_predictions, compute_metrics, write_scores

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    r, n = score_split(cfg, split_path, export=export, limit=limit, batch_size=batch_size, rank=rank, world=world,
                       projector=projector)
    # items travel with the user column packed as user * n_items_bound + item? keep it simple: gather twice.
    idx, usr, lab, sco = gather_predictions(r["idx"], r["user"], r["label"], r["score"], expected_count=n)
    _, itm, _, _ = gather_predictions(r["idx"], r["item"], r["label"], r["score"], expected_count=n)
    m = compute_metrics(usr, lab, sco, ks)
    if scores_out and rank == 0:
        write_scores(scores_out, idx, usr, itm, lab, sco)
    return m
