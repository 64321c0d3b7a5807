"""Score a ThinkRec model on a prepared split: AUC/UAUC + HR/NDCG/MAP@k, per-sample scores to Parquet.

The score of a sample is what the training objective reads: the raw logit of the first token of
``yes_text`` (or the Yes-No margin with ``rec_score: yes_minus_no``) at the row that predicts the answer's
first token of a label-only prompt. Samples are split across ranks (rank r takes r, r+W, ...), gathered,
de-duplicated and counted against the split size (distthink.tasks.thinkrec.metrics.distributed_metrics), so the
figures are exact whatever the number of ranks.

Loading. ``export`` is a stage's adapter export (``train.output_dir/export``). With a from-config base
(the tiny demo model) the export ships the base weights in ``export/base_model``; otherwise the base is
``model.name_or_path`` of the config. A ``prompt_mode: ids`` stage's export also holds the projector
(``projector.safetensors``), picked up automatically (see projector_source).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distthink.config import Config, resolve_attention, resolve_device, resolve_dtype
from distthink.data.packing import batch_to
from distthink.engine import batching as train_data
from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.attention import model_inputs
from distthink.models.load import build_model_config, load_tokenizer
from distthink.models.molora import global_gate, hard_gate, molora_gates
from distthink.models.molora_export import read_molora_json
from distthink.tasks.thinkrec.cf_source import open_cf_source
from distthink.tasks.thinkrec.gate import BRANCH_NAMES, load_molora
from distthink.tasks.thinkrec.metrics import compute_metrics, gather_predictions, write_scores
from distthink.tasks.thinkrec.model import SCORE_KEYS, build_wrapper, side_inputs
from distthink.tasks.thinkrec.projector_export import PROJECTOR_META, load_projector_export
from distthink.tasks.thinkrec.samples import split_encoding
from distthink.tasks.thinkrec.task import ThinkRecTask

log = get_logger(__name__)


def eval_placement(cfg: Config) -> tuple[torch.device, torch.dtype]:
    """Where `rec eval` scores and in which dtype: the stage config's train.device and model.dtype (`auto` = the
    GPU in bf16 when one is visible, the CPU in fp32 otherwise; `train.device=cpu` as an override forces the CPU).
    Each rank of a torchrun launch takes its own GPU (LOCAL_RANK)."""
    device = resolve_device(cfg)
    index = int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else None
    return torch.device(device, index) if index is not None else torch.device(device), resolve_dtype(cfg, device)


def load_for_eval(cfg: Config, export: str | None, tokenizer, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32):
    """The causal LM (with the export's adapter when given), eval mode, in `dtype` on `device` (default: the CPU),
    with the attention that can run there (distthink.config.resolve_attention)."""
    device = device or torch.device("cpu")
    attn = resolve_attention(cfg.model.attn_implementation, device.type, dtype)
    kw = dict(attn_implementation=attn, dtype=dtype)
    base_dir = Path(export) / "base_model" if export else None
    if export and not (Path(export) / "adapter_config.json").is_file() and (Path(export) / "config.json").is_file():
        # a full-model export (checkpoint.export=full)
        return AutoModelForCausalLM.from_pretrained(str(export), **kw).to(device).eval()
    if base_dir is not None and base_dir.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kw)
    elif cfg.model.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, **kw)
    else:
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_config(build_model_config(cfg, tokenizer), **kw)
        log.warning("no base weights found: scoring a randomly initialised %s", cfg.model.from_config)
    if export:
        if not (Path(export) / "adapter_config.json").is_file():
            raise ConfigError(f"--export {export} is not a PEFT adapter export. Fix: pass train.output_dir/export "
                              "of a run with checkpoint.export=adapter")

        model = PeftModel.from_pretrained(model, export)
    return model.to(device).eval()


FUSION_MODES = ("fusion", "global", "hard")


class FusionGates:
    """Stage-3 gates per sample for the three evaluation modes (docs/molora.md, "Evaluating fusion").

    fusion: the entropy gate stored in molora.json on the CF user vectors (task.options.cf_export);
    global: every sample on the global adapter; hard: one-hot by the export's user -> group table
    (users absent from it: the global adapter), as in stage-3 training.
    """

    def __init__(self, molora_dir: Path, gate, num_experts: int, cf_export: str | None, groups_dir: str | None):
        meta = read_molora_json(molora_dir)
        if gate is None:
            raise ConfigError(f"{molora_dir}/molora.json has no gate (centroids). Fix: export stage 3 with its "
                              "groups folder (task.options.molora.groups_dir)")
        if not cf_export:
            raise ConfigError("rec eval --fusion needs the CF user vectors for the entropy gate. Fix: set "
                              "task.options.cf_export (the `distthink rec train-cf` folder of the grouping)")
        table_path = molora_dir / meta["user_groups"] if meta.get("user_groups") else \
            (Path(groups_dir) / "user_groups.parquet" if groups_dir else None)
        if table_path is None or not table_path.is_file():
            raise ConfigError(f"{molora_dir}: no user_groups.parquet in the export and no "
                              "task.options.molora.groups_dir. Fix: pass the stage's config")

        self.gate, self.k = gate, num_experts
        table = open_cf_source(cf_export).user  # None for inline vectors: the rows' own User_emb are used
        self.cf_user = None if table is None else table.detach().float().cpu()
        table = pd.read_parquet(table_path)
        n = int(max(table["user_id"].max(), 0)) + 1
        self.user_group = torch.full((n,), -1, dtype=torch.long)
        self.user_group[torch.as_tensor(table["user_id"].to_numpy().copy(), dtype=torch.long)] = torch.as_tensor(
            table["group"].to_numpy().copy(), dtype=torch.long)

    def __call__(self, user_ids: torch.Tensor, user_vecs: torch.Tensor | None = None) -> dict:
        """(S,) user ids (+ (S, d) per-row user vectors when the source has no table) -> {mode: (S, K+1) gates}
        + {"branch": (S,) long} and {"weights"} of the entropy gate."""
        u = torch.as_tensor(user_ids).detach().cpu().long()
        if self.cf_user is None:
            dec = self.gate(user_vecs.detach().float().cpu())
        else:
            bad = (u < 0) | (u >= self.cf_user.shape[0])
            if bad.any():
                raise ConfigError(f"user id {int(u[bad][0])} is outside the CF table ({self.cf_user.shape[0]} users). "
                                  "Fix: task.options.cf_export must be the CF export of the prepared data")
            dec = self.gate(self.cf_user[u])
        g = torch.full_like(u, -1)
        known = u < self.user_group.numel()
        g[known] = self.user_group[u[known]]
        return {"fusion": dec.weights, "global": global_gate(len(u), self.k), "hard": hard_gate(g, self.k),
                "branch": dec.branch}


def load_stage3_for_eval(export: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32):
    """(model with MoLoRA layers, EntropyGate|None, molora dir) from a stage-3 export: the plain base model in
    ``export/`` (config.json + weights) and the adapters in ``export/molora`` (distthink.models.molora_export),
    in `dtype` on `device` (default: the CPU; adapters of a 16-bit base stay fp32, as in training)."""
    ex = Path(export)
    mdir = ex / "molora" if (ex / "molora" / "molora.json").is_file() else ex
    if not (mdir / "molora.json").is_file():
        raise ConfigError(f"--export {export} holds no molora/molora.json. Fix: pass train.output_dir/export of a "
                          "stage-3 run (task.options.molora)")
    base_dir = mdir.parent
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"{base_dir} holds no base model (config.json). Fix: pass the stage-3 export folder "
                          "(checkpoint.export=full writes the plain base there)")
    device = device or torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype,
                                                 attn_implementation=resolve_attention("auto", device.type, dtype))
    model, gate = load_molora(model, mdir, dropout=0.0)
    return model.to(device).eval(), gate, mdir


@torch.no_grad()
def score_split_fusion(cfg: Config, split_path: str, *, export: str, limit: int | None = None, batch_size: int = 8,
                       rank: int = 0, world: int = 1, gates_fn=None):
    """Stage-3 export: scores of this rank's share under each gate mode (FUSION_MODES) and the entropy gate's
    branch per sample. gates_fn(user_ids) -> {mode: (S, K+1)} replaces the modes it names (tests)."""
    task = ThinkRecTask(cfg)
    opt = task.opt
    ex = Path(export).parent if (Path(export) / "molora.json").is_file() else Path(export)  # export or export/molora
    source = projector_source(opt, str(ex), None) if opt.prompt_mode == "ids" else None
    tokenizer, samples = eval_samples(cfg, task, split_path, limit)
    device, dtype = eval_placement(cfg)
    model, gate, mdir = load_stage3_for_eval(export, device, dtype)
    _log_placement(model, len(samples), rank, world)
    gates = FusionGates(mdir, gate, gate.num_experts if gate is not None else 0, opt.cf_export,
                        opt.molora.groups_dir if opt.molora else None)
    wrapper = eval_wrapper(model, tokenizer, opt, source, device)
    out = {"idx": [], "user": [], "item": [], "label": [], "branch": [], **{m: [] for m in FUSION_MODES}}
    for part, batch in _eval_batches(task, tokenizer, samples, rank, world, batch_size, device):
        g = gates(batch["user_ids"], batch.get("user_vecs"))
        if gates_fn is not None:
            g.update(gates_fn(batch["user_ids"]))
        for mode in FUSION_MODES:
            with molora_gates(model, g[mode].to(batch["input_ids"].device), segment_ids=batch["segment_ids"]):
                out[mode] += _batch_scores(wrapper, model, batch).double().tolist()
        out["branch"] += g["branch"].tolist()
        _add_sample_columns(out, part)
    return {k: np.asarray(v) for k, v in out.items()}, len(samples)


def evaluate_fusion(cfg: Config, split_path: str, *, export: str, limit: int | None = None,
                    scores_out: str | None = None, batch_size: int = 8, ks=(1, 5, 10), gates_fn=None) -> dict:
    """Collective. {"fusion"|"global"|"hard": metrics, "branch_counts": {expert, global, fuse}} over the whole
    split (exact gather); rank 0 writes Parquet with score_<mode> and gate_branch columns."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    r, n = score_split_fusion(cfg, split_path, export=export, limit=limit, batch_size=batch_size, rank=rank,
                              world=world, gates_fn=gates_fn)
    full = {}
    for mode in FUSION_MODES:
        full[mode] = gather_predictions(r["idx"], r["user"], r["label"], r[mode], expected_count=n)
    _, itm, _, _ = gather_predictions(r["idx"], r["item"], r["label"], r["fusion"], expected_count=n)
    idx, usr, lab, br = gather_predictions(r["idx"], r["user"], r["label"], r["branch"].astype(np.float64),
                                           expected_count=n)
    br = br.astype(np.int64)
    out = {mode: compute_metrics(full[mode][1], full[mode][2], full[mode][3], ks) for mode in FUSION_MODES}
    out["branch_counts"] = {name: int((br == b).sum()) for b, name in enumerate(BRANCH_NAMES)}
    if scores_out and rank == 0:
        write_scores(scores_out, idx, usr, itm, lab, full["fusion"][3],
                     extra={**{f"score_{m}": full[m][3] for m in FUSION_MODES},
                            "gate_branch": np.asarray([BRANCH_NAMES[b] for b in br])})
    return out


@torch.no_grad()
def score_split(cfg: Config, split_path: str, *, export: str | None = None, limit: int | None = None,
                batch_size: int = 8, rank: int = 0, world: int = 1, projector: str | None = None):
    """Scores of this rank's share of the split. Returns (sample_index, users, items, labels, scores) arrays
    of this rank and the split size."""
    task = ThinkRecTask(cfg)
    source = projector_source(task.opt, export, projector) if task.opt.prompt_mode == "ids" else None
    tokenizer, samples = eval_samples(cfg, task, split_path, limit)
    device, dtype = eval_placement(cfg)
    model = load_for_eval(cfg, export, tokenizer, device, dtype)
    _log_placement(model, len(samples), rank, world)
    wrapper = eval_wrapper(model, tokenizer, task.opt, source, device)
    out = {"idx": [], "user": [], "item": [], "label": [], "score": []}
    for part, batch in _eval_batches(task, tokenizer, samples, rank, world, batch_size, device):
        out["score"] += _batch_scores(wrapper, model, batch).double().tolist()
        _add_sample_columns(out, part)
    return {k: np.asarray(v) for k, v in out.items()}, len(samples)


# Shared by score_split and score_split_fusion.

def _log_placement(model, n: int, rank: int, world: int) -> None:
    w = next(model.parameters())
    attn = getattr(getattr(model, "config", None), "_attn_implementation", "?")
    log.info("rec eval: %d rows (rank %d of %d) on %s in %s, attention=%s", len(range(rank, n, world)), rank, world,
             w.device, str(w.dtype).replace("torch.", ""), attn)


def eval_samples(cfg: Config, task, split_path: str, limit: int | None):
    """(tokenizer with the placeholder tokens, the split's samples as label-only prompts), from the encoded-data
    cache (collective under a process group: one rank encodes, every rank reads)."""
    tokenizer = load_tokenizer(cfg)
    task.prepare_tokenizer(tokenizer)
    enc = split_encoding(tokenizer, split_path, task.opt, train_data.chat_policy(cfg), seed=cfg.train.seed,
                         split="test", reason_ratio=0.0, limit=limit)
    return tokenizer, train_data.open_encoding(cfg, enc, tokenizer, f"rec eval {Path(split_path).name}",
                                               progress=False)


def eval_wrapper(model, tokenizer, opt, source, device: torch.device | None = None):
    """The scoring wrapper around an exported model: the export already holds the adapters, and the projector
    is loaded from `source` (projector_source), never from the training-time options. Moved to `device` with
    the model (the projector and the CF tables with it)."""
    opt.init_adapter, opt.freeze_lora, opt.init_projector = None, False, None
    wrapper = build_wrapper(model, tokenizer, opt, impl="hf").eval()
    if source is not None:
        _load_projector_from(wrapper, source, opt)
    return wrapper.to(device) if device is not None else wrapper


def _eval_batches(task, tokenizer, samples, rank: int, world: int, batch_size: int, device=None):
    """(samples, collated batch on `device`) of this rank's strided share of the split."""
    collate = task.collator(tokenizer)
    mine = list(range(rank, len(samples), world))
    for i in range(0, len(mine), batch_size):
        part = [samples[j] for j in mine[i:i + batch_size]]
        batch = collate(part)
        yield part, (batch_to(batch, device) if device is not None else batch)


def _batch_scores(wrapper, model, batch) -> torch.Tensor:
    attn = model.config._attn_implementation if hasattr(model, "config") else "sdpa"
    dtype = next(model.parameters()).dtype  # eager's additive mask in the model's dtype
    return wrapper.score(**side_inputs(batch, SCORE_KEYS),
                         **model_inputs(batch, attn, dtype=dtype, with_input_ids=False))


def _add_sample_columns(out: dict, part) -> None:
    out["idx"] += [s.meta["index"] for s in part]
    out["user"] += [s.meta["user_id"] for s in part]
    out["item"] += [s.meta["item_id"] for s in part]
    out["label"] += [s.meta["label"] for s in part]


def projector_source(opt, export: str | None, projector: str | None) -> tuple[str, str]:
    """Where the projector of a prompt_mode=ids stage comes from, in this order: ``--projector`` (a checkpoint's
    model.safetensors), the ``--export`` folder's projector.safetensors (written by the stage's export), the
    config's ``init_projector`` when the stage kept it frozen. ("checkpoint" | option name, path)."""
    if projector:
        return "checkpoint", projector
    if export and (Path(export) / PROJECTOR_META).is_file():
        return "--export", str(export)
    if opt.init_projector and not opt.train_projector:
        return "task.options.init_projector", opt.init_projector
    raise ConfigError("rec eval of a prompt_mode=ids stage needs the trained projector. Fix: pass --export "
                      "train.output_dir/export of the stage (it holds projector.safetensors), or --projector "
                      "CHECKPOINT/model.safetensors (ZeRO-3 checkpoints consolidated with DeepSpeed's zero_to_fp32)")


def _load_projector_from(wrapper, source: tuple[str, str], opt) -> None:
    kind, path = source
    if kind == "checkpoint":
        load_projector(wrapper, path)
        return

    # opt=None: a CF space other than the projector's is refused at eval (no training can adapt it)
    load_projector_export(wrapper.projector, path, None, cf=open_cf_source(opt.cf_export), option=kind)


def load_projector(wrapper, path: str) -> None:
    """Load the `projector.*` tensors of a (non-ZeRO-3 or consolidated) training checkpoint's safetensors."""
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
