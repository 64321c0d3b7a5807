"""`distthink rec explain`: the verdict and the reason a trained ThinkRec model writes for each (user, item) row.

Per row of a prepared split, the label-only prompt of the stage (the same tokens as training and `rec eval`, cut
right before the verdict) is continued by generation: CF vectors injected at the id placeholders (the stage's
projector, per-row vectors included), and for a stage-3 export the experts mixed per row by the gate stored in
molora.json (`--mode fusion`, the default), the global adapter alone (`global`) or one-hot by the group table
(`hard`). Greedy or sampled, in batches (left-padded; one gate row per prompt).

The first generated position is the verdict position the recommendation objective scores, so its raw logits give
the score (`rec_score`: the Yes logit, or Yes minus No) and ``yes_prob = sigmoid(score)`` without a second pass
(equal to `rec eval`'s score up to float rounding; tested). ``scored_verdict`` is ``score > 0``;
``generated_verdict`` is the verdict word the generation starts with (null when it starts with something else).

Output JSONL, one record per row in split order: sample_index, user_id, item_id, label, score, yes_prob,
scored_verdict, generated_verdict, reason (the text after the verdict), text (the whole generation),
finish_reason, num_new_tokens, reference_reason (the row's `reason`, when it has one), mode, gate_branch and
gate_weights (stage 3). Metrics: verdict agreement (generated vs scored, over rows whose generation starts with a
verdict), the rows with a non-empty reason, and BLEU-4 (corpus), ROUGE-L and METEOR-nosyn (means) of the reason
against the reference reason over the rows that have both (distthink.inference.metrics; verdict words removed
from both sides).

Several ranks (torchrun / accelerate launch): rank r takes rows r, r+W, ...; records are gathered to rank 0. With
`distributed.deepspeed` naming a ZeRO-3 JSON the model is partitioned across the ranks (`deepspeed.initialize`,
no optimizer) and the ranks generate in lockstep (transformers' `synced_gpus`); every rank runs the same number of
batches, a rank without rows left running a discarded dummy row, since each decoder forward gathers the
partitioned weights collectively. Sampling draws from a per-rank generator seeded with (seed, rank), so sampled
texts depend on the number of ranks; greedy texts do not.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from distthink.config import Config, deepspeed_config
from distthink.errors import ConfigError
from distthink.inference.generate import GenerationOptions, Generator
from distthink.inference.metrics import corpus_bleu4, meteor_available, meteor_nosyn, rouge_l, tokenize
from distthink.logging_utils import get_logger
from distthink.models.molora import molora_gates
from distthink.tasks.thinkrec.evaluate import (
    FUSION_MODES,
    FusionGates,
    eval_samples,
    eval_wrapper,
    load_for_eval,
    load_stage3_for_eval,
    projector_source,
)
from distthink.tasks.thinkrec.gate import BRANCH_NAMES
from distthink.tasks.thinkrec.prepare import read_split
from distthink.tasks.thinkrec.prompts import split_verdict
from distthink.tasks.thinkrec.task import ThinkRecTask

log = get_logger(__name__)


class ThinkRecPromptInputs:
    """The generator's PromptInputs hook for ThinkRec: token embeddings with the projected CF vectors written at
    the id placeholders (the wrapper's own `embed`, so generation injects exactly what training did). extras[i]:
    the prompt's sample meta (user_id, item_id, history_ids, per-row cf_* vectors when the samples carry them)."""

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def inputs_embeds(self, model, input_ids: torch.Tensor, extras: Sequence[Any] | None) -> torch.Tensor:
        w = self.wrapper
        if w.projector is None or extras is None:
            return model.get_input_embeddings()(input_ids)
        dev = input_ids.device

        def ids(key):
            return torch.tensor([int(e[key]) for e in extras], dtype=torch.long, device=dev)

        vecs = {}
        for meta_key, key in (("cf_user", "user_vecs"), ("cf_target", "target_vecs")):
            if meta_key in extras[0]:
                vecs[key] = torch.as_tensor(np.stack([e[meta_key] for e in extras]), device=dev)
        if "cf_hist" in extras[0]:
            vecs["hist_vecs"] = torch.as_tensor(np.concatenate([e["cf_hist"] for e in extras]), device=dev)
        hist = torch.tensor([i for e in extras for i in e["history_ids"]], dtype=torch.long, device=dev)
        counts = torch.tensor([len(e["history_ids"]) for e in extras], dtype=torch.long, device=dev)
        return w.embed(input_ids, None, ids("user_id"), ids("item_id"), hist, counts, **vecs)


def find_molora_dir(export: str) -> Path | None:
    """export/molora (or export itself) when it holds molora.json: a stage-3 export."""
    ex = Path(export)
    for d in (ex / "molora", ex):
        if (d / "molora.json").is_file():
            return d
    return None


def _setup_zero3(cfg: Config, wrapper, world: int):
    """Partition the wrapper across the ranks with DeepSpeed ZeRO-3 (inference: no optimizer). Returns the module
    to use (the engine's), or the wrapper unchanged when the run is not ZeRO-3 on several ranks."""
    if world < 2 or not cfg.distributed.deepspeed:
        return wrapper, False
    ds = deepspeed_config(cfg, world)
    if int(ds.get("zero_optimization", {}).get("stage", 0)) != 3:
        return wrapper, False  # ZeRO-1/2 keep full weights on every rank: each rank generates on its own
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # lazy: heavy, and only needed for partitioned inference

    engine = deepspeed.initialize(model=wrapper, config=ds)[0]
    log.info("rec explain: the model is partitioned across %d ranks (ZeRO-3); generation runs in lockstep", world)
    return engine.module, True


def _reference(df, index: int) -> str:
    if "reason" not in df.columns:
        return ""
    value = df["reason"].iloc[index]
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()


@torch.no_grad()
def explain_split(cfg: Config, split_path: str, *, export: str, mode: str = "fusion",
                  gen: GenerationOptions | None = None, limit: int | None = None, projector: str | None = None,
                  device: str = "cpu", rank: int = 0, world: int = 1) -> list[dict]:
    """This rank's records (module docstring). Collective under ZeRO-3: every rank must call it."""
    gen = gen or GenerationOptions(max_new_tokens=64, batch_size=8)
    gen.validate()
    task = ThinkRecTask(cfg)
    opt = task.opt
    mdir = find_molora_dir(export)
    if mode not in FUSION_MODES:
        raise ConfigError(f"rec explain --mode {mode!r}. Fix: use one of {list(FUSION_MODES)}")
    export_root = str(mdir.parent) if mdir is not None and mdir.name == "molora" else export
    source = projector_source(opt, export_root, projector) if opt.prompt_mode == "ids" else None
    tokenizer, samples = eval_samples(cfg, task, split_path, limit)
    df = read_split(split_path)
    gates = None
    if mdir is not None:
        model, gate, mdir = load_stage3_for_eval(export)
        gates = FusionGates(mdir, gate, gate.num_experts if gate is not None else 0, opt.cf_export,
                            opt.molora.groups_dir if opt.molora else None)
    else:
        model = load_for_eval(cfg, export, tokenizer)
    wrapper = eval_wrapper(model, tokenizer, opt, source)
    wrapper, synced = _setup_zero3(cfg, wrapper, world)
    if not synced:
        wrapper = wrapper.to(device)
    wrapper.eval()
    lm = wrapper.model
    generator = Generator(lm, tokenizer, ThinkRecPromptInputs(wrapper))
    gen.synced_gpus = synced
    torch.manual_seed(gen.seed * 1000 + rank)  # sampling: one stream per rank
    yes, no = wrapper.yes_id, wrapper.no_id
    mine = list(range(rank, len(samples), world))
    # the same number of batches on every rank (ZeRO-3 forwards are collective)
    n_batches = math.ceil(math.ceil(len(samples) / world) / gen.batch_size)
    records = []
    for b in range(n_batches):
        part = mine[b * gen.batch_size:(b + 1) * gen.batch_size]
        rows = part or [mine[0] if mine else 0]  # a dummy row keeps a rank without rows in step
        batch = [samples[j] for j in rows]
        prompts = [s.input_ids[:s.meta["answer_row"] + 1] for s in batch]
        extras = [s.meta for s in batch]
        g, ctx = None, nullcontext()
        if gates is not None:
            user_vecs = torch.as_tensor(np.stack([m["cf_user"] for m in extras])) if "cf_user" in extras[0] else None
            g = gates(torch.tensor([m["user_id"] for m in extras]), user_vecs)
            ctx = molora_gates(lm, g[mode].to(generator.device))
        with ctx:
            out, _, logits = generator.generate_ids_with_first_logits(prompts, extras, gen)
        if not part:
            continue
        sel = logits[:, [yes, no]].double().cpu()
        scores = sel[:, 0] - sel[:, 1] if opt.rec_score == "yes_minus_no" else sel[:, 0]
        for i, (s, ids) in enumerate(zip(batch, out)):
            stop = next((k for k, t in enumerate(ids) if t in generator.stop_ids), None)
            ids = ids[:stop] if stop is not None else ids
            text = tokenizer.decode(ids, skip_special_tokens=False)
            verdict, reason = split_verdict(text, opt.yes_text, opt.no_text)
            score = float(scores[i])
            rec = {"sample_index": int(s.meta["index"]), "user_id": int(s.meta["user_id"]),
                   "item_id": int(s.meta["item_id"]), "label": int(s.meta["label"]), "score": score,
                   "yes_prob": 1.0 / (1.0 + math.exp(-score)), "scored_verdict": opt.yes_text if score > 0
                   else opt.no_text, "generated_verdict": None if verdict is None else
                   (opt.yes_text if verdict else opt.no_text), "reason": reason, "text": text,
                   "finish_reason": "stop" if stop is not None else "length", "num_new_tokens": len(ids),
                   "reference_reason": _reference(df, int(s.meta["index"])), "mode": mode if g is not None else None}
            if g is not None:
                rec["gate_branch"] = BRANCH_NAMES[int(g["branch"][i])]
                rec["gate_weights"] = [round(float(x), 6) for x in g[mode][i]]
            records.append(rec)
    return records


def explain_metrics(records: list[dict], yes_text: str = "Yes", no_text: str = "No") -> dict:
    """Verdict agreement and reason-quality figures over the records (module docstring)."""
    parsed = [r for r in records if r["generated_verdict"] is not None]
    agree = sum(r["generated_verdict"] == r["scored_verdict"] for r in parsed)
    out = {"rows": len(records), "verdict_parsed": len(parsed),
           "verdict_agreement": agree / len(parsed) if parsed else None,
           "scored_accuracy": (sum((r["scored_verdict"] == yes_text) == bool(r["label"]) for r in records)
                               / len(records)) if records else None,
           "generated_accuracy": (sum((r["generated_verdict"] == yes_text) == bool(r["label"]) for r in parsed)
                                  / len(parsed)) if parsed else None,
           "with_reason": sum(bool(r["reason"]) for r in records)}
    pairs = [(tokenize(r["reason"]), tokenize(split_verdict(r["reference_reason"], yes_text, no_text)[1]))
             for r in records if r["reason"] and r["reference_reason"]]
    out["reason_pairs"] = len(pairs)
    if pairs:
        hyps, refs = zip(*pairs)
        out["bleu4"] = corpus_bleu4(hyps, refs)
        out["rouge_l"] = float(np.mean([rouge_l(h, r)["f"] for h, r in pairs]))
        out["meteor_nosyn"] = float(np.mean([meteor_nosyn(h, r) for h, r in pairs])) if meteor_available() else None
    branches = [r["gate_branch"] for r in records if "gate_branch" in r]
    if branches:
        out["branch_counts"] = {name: branches.count(name) for name in BRANCH_NAMES}
    return out


def explain(cfg: Config, split_path: str, *, export: str, out: str | None = None, mode: str = "fusion",
            gen: GenerationOptions | None = None, limit: int | None = None, projector: str | None = None,
            device: str = "cpu") -> dict:
    """Collective when a process group is initialised: every rank generates its rows; rank 0 gathers, writes the
    JSONL (split order) and returns the metrics (other ranks return {})."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    gen = gen or GenerationOptions(max_new_tokens=64, batch_size=8)
    mine = explain_split(cfg, split_path, export=export, mode=mode, gen=gen, limit=limit, projector=projector,
                         device=device, rank=rank, world=world)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    if rank != 0:
        return {}
    records = sorted((r for p in parts for r in p), key=lambda r: r["sample_index"])
    if len({r["sample_index"] for r in records}) != len(records):
        raise ConfigError("rec explain: a row was generated twice (the ranks disagree on the split). Fix: run every "
                          "rank with the same --split / --limit")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    task_opt = ThinkRecTask(cfg).opt
    metrics = explain_metrics(records, task_opt.yes_text, task_opt.no_text)
    metrics["generation"] = {k: v for k, v in asdict(gen).items() if k != "synced_gpus"}
    metrics["world_size"] = world
    return metrics
