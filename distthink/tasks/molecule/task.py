"""Molecule captioning task (`task.name: molecule`): SMILES -> graph encoder -> `<|graph|>` tokens -> caption.

Per sample: the demo-set record (or your JSONL row: `smiles`, `description`, optional `reasoning_content`)
becomes a chat via `caption_messages`, encoded with `encode_chat`; the RDKit graph travels in
`EncodedSample.meta["graphs"]`. The collator adds one PyG `Batch` per micro-batch plus the per-sample graph
counts; the wrapper (`MoleculeModel`) owns the LM *and* the graph encoder + projector as submodules, so
accelerate/DeepSpeed prepare, partition (ZeRO-3), reduce and checkpoint them like any LM weight.

Thinking modes (`task.options.think_mode`):
- `off` (no-think): system prompt carries `/no_think`, template rendered with enable_thinking=False; the
  learned tokens are the description plus end of turn (the template's empty think block is prompt).
- `dynamic`: thinking prompt (no `/no_think`), teacher-forced on the rendered assistant turn; the fused
  loss's dynamic weights (`dynamic: argmax | soft`) count a sample's tokens only after the position where the
  model itself predicts `</think>` (docs/ops.md). Needs loss.impl=fused.
- `supervised`: rows carry `reasoning_content`; encode_chat learns reasoning + description (data.policy).
- `free`: on-policy thoughts. `on_step_start` (trainer hook) samples `<think>…` with the current model for the
  step's samples (budget `max_think_tokens`, regenerated when `regen_every` steps old), closes and counts
  unfinished thoughts, appends the gold description and learns only it (thought weight 0). Under ZeRO-3 the
  generation is collective (synchronised ranks, dummy forwards on ranks that are done or have nothing stale).

Options are validated by `MoleculeOptions`; see docs/molecules.md for the table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from distthink.config import Config
from distthink.errors import ConfigError, DataError, DistthinkError
from distthink.logging_utils import get_logger
from distthink.tasks.sft import SFTTask

log = get_logger(__name__)

GRAPH_TOKEN = "<|graph|>"
THINK_MODES = ("off", "dynamic", "supervised", "free")
TRAIN_PARTS = ("encoder", "projector", "llm", "all")
PREFIX_FILE = "graph_prefix.safetensors"
PREFIX_META = "graph_prefix.json"


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


def build_prefix(graph_cfg: dict, llm_hidden: int):
    """GraphEncoder + projector from a graph config dict (MoleculeOptions.graph_config / graph_prefix.json)."""
    from distthink.tasks.molecule.encoder import GraphEncoder, GraphPrefix

    enc = GraphEncoder(hidden=graph_cfg["hidden"], num_layers=graph_cfg["num_layers"], conv=graph_cfg["conv"],
                       pool=graph_cfg["pool"], dropout=graph_cfg["dropout"])
    return GraphPrefix(enc, llm_hidden, k=graph_cfg["graph_tokens"], mult=graph_cfg["proj_mult"])


def molecule_inputs_embeds(model, prefix, input_ids: torch.Tensor, graph_token_id: int | None, graph_batch,
                           graphs_per_sample: torch.Tensor | None, segment_ids: torch.Tensor | None = None):
    """(B, T, H) inputs_embeds: the LM's token embeddings with projected graph vectors at `<|graph|>` tokens.

    Calls the embedding *module* (not its weight), so ZeRO-3 gathers it; with no graphs (text-only prompts)
    it is the plain embedding.
    """
    from distthink.models.inject import PlaceholderSlot, inject_placeholders

    embeds = model.get_input_embeddings()(input_ids)
    if graph_batch is None or prefix is None:
        if graph_token_id is not None and bool((input_ids == graph_token_id).any()):
            raise DistthinkError(f"the batch has {GRAPH_TOKEN} tokens but no graphs. Fix: pass the molecules' "
                                 "graphs, or build text-only prompts (use_graph=false)")
        return embeds
    vectors = prefix(graph_batch.to(input_ids.device)).to(embeds.dtype)
    slot = PlaceholderSlot(token_id=graph_token_id, vectors=vectors, counts=graphs_per_sample, name=GRAPH_TOKEN)
    inplace = not (embeds.is_leaf and embeds.requires_grad)
    return inject_placeholders(input_ids, embeds, [slot], segment_ids=segment_ids, inplace=inplace)


class MoleculeModel(torch.nn.Module):
    """The module the trainer prepares: LM (`.model`, possibly PEFT) + `.prefix` (GraphPrefix or None).

    forward(batch pieces) -> 0-d float32 weighted loss sum (unnormalised), through the fused loss with
    optional dynamic weights (after-`</think>` counting).
    """

    def __init__(self, model, prefix, graph_token_id: int | None, *, impl: str, chunk_size: int,
                 dynamic: str | None, think_end_id: int | None):
        super().__init__()
        from distthink.models.load import base_causal_lm, is_partitioned

        self.model = model
        self.prefix = prefix
        self.graph_token_id = graph_token_id
        self.impl, self.chunk_size, self.dynamic, self.think_end_id = impl, chunk_size, dynamic, think_end_id
        self._base = [base_causal_lm(model)]  # list: not a second registered submodule
        if impl == "fused" and is_partitioned(model):
            import deepspeed

            # the fused loss reads lm_head.weight directly: DeepSpeed must gather it for this forward
            deepspeed.zero.register_external_parameter(self, self._base[0].lm_head.weight)

    def forward(self, input_ids, targets, target_weights, segment_ids, graph_batch, graphs_per_sample,
                **model_kwargs) -> torch.Tensor:
        from distthink.engine.lm_loss import weighted_ce_sum

        base = self._base[0]
        if not getattr(self, "_logged", False) and self.prefix is not None:
            self._logged = True
            log.info("graph encoder + projector: %d params, partitioned by ZeRO-3: %s",
                     sum(getattr(p, "ds_numel", p.numel()) for p in self.prefix.parameters()),
                     any(hasattr(p, "ds_id") for p in self.prefix.parameters())
                     and all(p.data.numel() < p.ds_numel for p in self.prefix.parameters() if p.ds_numel > 1))
        embeds = molecule_inputs_embeds(self.model, self.prefix, input_ids, self.graph_token_id, graph_batch,
                                        graphs_per_sample, segment_ids=segment_ids)
        flat_t, flat_w = targets.reshape(-1), target_weights.reshape(-1)
        if self.impl == "hf":
            logits = self.model(inputs_embeds=embeds, **model_kwargs).logits
            return weighted_ce_sum(logits.reshape(-1, logits.shape[-1]), flat_t, flat_w)
        from distthink.ops import fused_linear_cross_entropy

        hidden = base.model(inputs_embeds=embeds, **model_kwargs).last_hidden_state
        weight = base.lm_head.weight
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        extra = {}
        if self.dynamic:
            extra = dict(dynamic=self.dynamic, think_end_id=self.think_end_id,
                         segment_ids=segment_ids.reshape(-1), position_ids=model_kwargs["position_ids"].reshape(-1))
        return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, flat_t,
                                          bias=base.lm_head.bias, token_weights=flat_w, reduction="sum",
                                          chunk_size=self.chunk_size, **extra)


def read_records(spec: str, split: str, on_error: str) -> tuple[list[dict], str]:
    """Rows of a split: `bundled`/`demo` = the shipped demo set (eval -> its test split), else a JSONL file."""
    from distthink.tasks.molecule.demo import load_demo

    if spec in ("bundled", "demo"):
        return load_demo("train" if split == "train" else "test"), f"demo:{split}"
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"data.{split}='{spec}' does not exist. Fix: a JSONL of {{smiles, description}} rows, "
                          "or `bundled` for the demo molecules")
    rows, skipped = [], 0
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                for key in ("smiles", "description"):
                    if not isinstance(rec.get(key), str) or not rec[key].strip():
                        raise DataError("missing or empty field", source=str(path), line=n, field=key,
                                        fix="every row needs a SMILES string and a description")
            except (json.JSONDecodeError, DataError) as err:
                if on_error == "raise":
                    if isinstance(err, DataError):
                        raise
                    raise DataError(f"invalid JSON ({err.msg})", source=str(path), line=n,
                                    fix="one JSON object per line") from None
                skipped += 1
                continue
            rec.setdefault("_line", n)
            rows.append(rec)
    if skipped:
        log.warning("%s: skipped %d malformed rows (on_error=skip)", path, skipped)
    return rows, str(path)


class MoleculeTask(SFTTask):
    """Graph-conditioned molecule captioning (see module docstring)."""

    name = "molecule"
    loss_keys = ("lm",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.opts = MoleculeOptions.from_config(cfg)
        self.graph_token_id: int | None = None

    # -- tokenizer and data ------------------------------------------------------------------------------
    def prepare_tokenizer(self, tokenizer) -> None:
        from distthink.models.inject import add_placeholder_tokens

        self.graph_token_id = add_placeholder_tokens(tokenizer, [GRAPH_TOKEN])[GRAPH_TOKEN]

    def thinking(self) -> bool:
        return self.opts.think_mode != "off"

    def messages(self, rec: dict) -> list[dict]:
        from distthink.tasks.molecule.demo import caption_messages

        msgs = caption_messages(rec["smiles"], rec["description"], use_graph=self.opts.use_graph,
                                k=self.opts.graph_tokens, include_smiles=self.opts.include_smiles,
                                thinking=self.thinking())
        if self.opts.think_mode == "supervised":
            msgs[-1]["reasoning_content"] = rec.get("reasoning_content", "")
        return msgs

    def load_split(self, split: str, tokenizer) -> list:
        from distthink.engine import batching as train_data
        from distthink.data.chat import encode_chat
        from distthink.tasks.molecule.graphs import smiles_to_graph

        spec = self.cfg.data.train if split == "train" else self.cfg.data.eval
        records, source = read_records(spec, split, self.opts.on_error)
        if self.opts.max_samples:
            records = records[:self.opts.max_samples]
        if self.opts.think_mode == "supervised":
            missing = sum(1 for r in records if not r.get("reasoning_content"))
            if missing:
                raise DataError(f"{missing} of {len(records)} rows have no reasoning_content",
                                source=source, field="reasoning_content",
                                fix="think_mode=supervised needs reasoning per row; use think_mode=dynamic otherwise")
        policy = train_data.chat_policy(self.cfg)
        policy = dataclasses.replace(policy, enable_thinking=self.thinking())
        samples, skipped = [], {}
        for i, rec in enumerate(records):
            line = rec.get("_line", i + 1)
            try:
                graph = smiles_to_graph(rec["smiles"], row=line, source=source) if self.opts.use_graph else None
                sample = encode_chat(tokenizer, self.messages(rec), policy=policy, source=source, line=line)
            except DataError as err:
                if self.opts.on_error == "raise":
                    raise
                skipped[err.reason or "invalid"] = skipped.get(err.reason or "invalid", 0) + 1
                continue
            sample.meta["graphs"] = [graph] if graph is not None else []
            sample.meta["id"] = rec.get("id", i)
            if self.opts.think_mode == "free":
                sample = self._free_template(tokenizer, sample, rec)
            samples.append(sample)
        log.info("molecule %s split %s: %d samples, skipped %s (think_mode=%s, graph=%s)", split, source,
                 len(samples), skipped or "none", self.opts.think_mode, self.opts.use_graph)
        if not samples:
            raise ConfigError(f"data.{split}='{spec}': no usable molecule sample. Fix: check the file")
        return samples

    # -- think_mode=free: on-policy thoughts ---------------------------------------------------------------
    def _free_template(self, tokenizer, sample, rec: dict):
        """Split a thinking-mode encoding into prompt (+ opened `<think>`) and the gold tail after `</think>`.

        The initial sample (used before its first regeneration, never trained on in practice since the
        thought is generated at the first step that uses it) is prompt + empty thought + description."""
        tok = tokenizer
        prompt_text = tok.apply_chat_template(self.messages(rec)[:2], tokenize=False, add_generation_prompt=True,
                                              enable_thinking=True)
        prompt = tok.encode(prompt_text, add_special_tokens=False)
        ids, labels = list(sample.input_ids), list(sample.labels)
        end = tok.convert_tokens_to_ids("</think>")
        opener = tok.encode("<think>\n", add_special_tokens=False)
        if ids[:len(prompt)] != prompt or end not in ids[len(prompt):]:
            raise DataError("the chat template's thinking render does not start with its generation prompt and "
                            "contain </think>", field="think_mode",
                            fix="use a Qwen3-style template, or think_mode=dynamic")
        at = ids.index(end, len(prompt))
        tail = ids[at + 1:]
        tail_labels = labels[at + 1:]
        # learned: the description and end of turn; the "\n\n" after </think> is context, not target
        lead = 0
        while lead < len(tail) and tok.decode([tail[lead]]).strip() == "":
            lead += 1
        weights = [0.0] * lead + [1.0 if lab != -100 else 0.0 for lab in tail_labels[lead:]]
        meta = dict(sample.meta, free_prompt=prompt + opener, free_tail=tail, free_tail_weights=weights,
                    free_end=end, free_step=None, free_think_len=0, free_closed_by_us=False)
        return self._free_sample(meta, [])

    @staticmethod
    def _free_sample(meta: dict, thought: list[int]):
        """prompt + `<think>\n` + thought + `</think>` + tail, learning only the tail's description."""
        from distthink.data.types import EncodedSample

        head = meta["free_prompt"] + list(thought) + [meta["free_end"]]
        ids = head + meta["free_tail"]
        w = [0.0] * len(head) + meta["free_tail_weights"]
        labels = [t if wi > 0 else -100 for t, wi in zip(ids, w)]
        return EncodedSample(input_ids=ids, labels=labels, loss_weights=w, meta=meta)

    def on_step_start(self, step: int, model, train_set: list, indices: list[int]) -> None:
        """Trainer hook (optional): refresh the on-policy thoughts of the samples this step uses.

        A sample's thought is regenerated when it was never generated or is `regen_every` steps old; the
        current model samples `<think>…` after the prompt (thinking budget `max_think_tokens`), unclosed thoughts
        are closed and counted, the gold description is appended, and train_set[i] is replaced in place.

        Under ZeRO-3 with several ranks this is collective: every rank must call it at the same step (the trainer
        does), whatever its own number of stale samples (0 included) and generation lengths."""
        if self.opts.think_mode != "free":
            return
        from distthink.inference.generate import GenerationOptions
        from distthink.inference.parse import close_thoughts

        stale = [i for i in indices if train_set[i].meta["free_step"] is None
                 or step - train_set[i].meta["free_step"] >= self.opts.regen_every]
        synced = self._synced_generation(model)
        if synced:
            # Collective from here on: under ZeRO-3 every decoder forward all-gathers the partitioned weights,
            # so either all ranks generate (a rank with nothing stale runs a discarded dummy row) or none does.
            from distthink.engine import distributed as dist

            if dist.all_reduce_sum([float(len(stale))], next(model.parameters()).device)[0] == 0:
                return
        elif not stale:
            return
        rows = stale or [indices[0] if indices else 0]  # the dummy row: any prompt of this rank's data
        gen = self._free_generator(model)
        end = gen.think_end_id
        opts = GenerationOptions(enable_thinking=True, do_sample=True, temperature=self.opts.temperature,
                                 top_p=self.opts.top_p, top_k=self.opts.top_k,
                                 max_new_tokens=self.opts.max_think_tokens + 1,
                                 max_think_tokens=self.opts.max_think_tokens, synced_gpus=synced)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            out, budget = gen.generate_ids([train_set[i].meta["free_prompt"] for i in rows],
                                           [train_set[i].meta["graphs"] for i in rows], opts)
        finally:
            model.train(was_training)
        gen_s = time.perf_counter() - t0
        if not stale:
            log.debug("free mode step %d: nothing stale on this rank, ran a dummy generation in sync", step + 1)
            return
        closed = close_thoughts(out, close_ids=[end], stop_ids=gen.stop_ids,
                                max_think_tokens=self.opts.max_think_tokens)
        for i, seq, n, by_us in zip(stale, closed.sequences, closed.think_lengths, closed.closed_by_us):
            meta = dict(train_set[i].meta, free_step=step, free_think_len=n, free_closed_by_us=bool(by_us))
            train_set[i] = self._free_sample(meta, seq[:-1])  # close_thoughts ends each sequence with </think>
        at_budget = int(budget.hit.sum()) if budget is not None and budget.hit is not None else 0
        self.free_stats = {"regenerated": len(stale), "closed_at_budget": at_budget,
                           "ended_unclosed": int(sum(closed.closed_by_us)),
                           "mean_think_len": sum(closed.think_lengths) / len(stale), "gen_s": gen_s}
        log.info("free mode step %d: regenerated %d thoughts: %d closed at the budget (%d tokens), %d ended the turn "
                 "inside the thought (closed by us), mean length %.1f tokens, %.2f s%s", step + 1, len(stale),
                 at_budget, self.opts.max_think_tokens, self.free_stats["ended_unclosed"],
                 self.free_stats["mean_think_len"], gen_s, " (ranks in sync)" if synced else "")

    @staticmethod
    def _synced_generation(model) -> bool:
        """True when the ranks must generate in lockstep: `model`'s weights are ZeRO-3 partitioned and there is
        more than one rank. DDP / ZeRO-1/2 ranks hold full weights, so each generates on its own (no per-token
        all_reduce)."""
        from distthink.models.load import is_partitioned

        return (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1 and is_partitioned(model))

    def _free_generator(self, model):
        from distthink.inference.generate import Generator

        if not hasattr(self, "_gen_tokenizer"):
            raise DistthinkError("free mode: the tokenizer is unknown (collator() was not called)")
        return Generator(model.model, self._gen_tokenizer, model.prefix, self.graph_token_id)

    def collator(self, tokenizer) -> Callable[[list], dict]:
        self._gen_tokenizer = tokenizer
        base = super().collator(tokenizer)

        def collate(samples: list) -> dict:
            from distthink.tasks.molecule.encoder import collate_sample_graphs

            batch = base(samples)
            batch["graph_batch"], batch["graphs_per_sample"] = collate_sample_graphs(
                [s.meta.get("graphs", []) for s in samples])
            return batch

        return collate

    # -- model -------------------------------------------------------------------------------------------
    def wrap_model(self, model, tokenizer) -> torch.nn.Module:
        from distthink.models.load import base_causal_lm

        prefix = None
        if self.opts.use_graph:
            torch.manual_seed(self.cfg.train.seed + 7)  # identical graph-side init on every rank
            dtype = next(model.parameters()).dtype
            prefix = build_prefix(self.opts.graph_config(), base_causal_lm(model).config.hidden_size).to(dtype)
            for name, part in (("encoder", prefix.encoder), ("projector", prefix.projector)):
                part.requires_grad_(self.opts.trains(name))
        if not self.opts.trains("llm"):
            model.requires_grad_(False)
        think_end = tokenizer.convert_tokens_to_ids("</think>") if self.opts.think_mode == "dynamic" else None
        if self.opts.think_mode == "dynamic" and (think_end is None or think_end == tokenizer.unk_token_id):
            raise ConfigError("think_mode=dynamic: the tokenizer has no `</think>` token. Fix: use a thinking "
                              "model's tokenizer (Qwen3) or think_mode=off")
        wrapped = MoleculeModel(model, prefix, self.graph_token_id, impl=self.cfg.loss.impl,
                                chunk_size=self.cfg.loss.chunk_size,
                                dynamic=self.opts.dynamic if self.opts.think_mode == "dynamic" else None,
                                think_end_id=think_end)
        n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        if n_train == 0:
            raise ConfigError(f"task.options.train_parts={self.opts.train_parts} leaves nothing trainable. "
                              "Fix: include encoder/projector (use_graph=true) or llm")
        return wrapped

    def forward(self, wrapped, batch: dict, attn_impl: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from distthink.data.packing import model_inputs

        loss_sum = wrapped(input_ids=batch["input_ids"], targets=batch["targets"],
                           target_weights=batch["target_weights"], segment_ids=batch["segment_ids"],
                           graph_batch=batch["graph_batch"], graphs_per_sample=batch["graphs_per_sample"],
                           **model_inputs(batch, attn_impl, dtype=dtype, with_input_ids=False))
        return {"lm": loss_sum}

    # -- export ------------------------------------------------------------------------------------------
    def prompt_meta(self) -> dict:
        """What a generator needs to rebuild this run's prompts and graph side (graph_prefix.json)."""
        return {**self.opts.graph_config(), "graph_token": GRAPH_TOKEN, "use_graph": self.opts.use_graph,
                "include_smiles": self.opts.include_smiles, "think_mode": self.opts.think_mode}

    def save_extra(self, accelerator, wrapped, out_dir: Path) -> None:
        """Collective: write the graph encoder + projector (and the prompt settings) next to the exported LM."""
        inner = accelerator.unwrap_model(wrapped)
        params = list(inner.prefix.parameters()) if inner.prefix is not None else []
        with _gathered(params):
            if accelerator.is_main_process:
                save_prefix(inner.prefix, self.prompt_meta(), out_dir)


def save_prefix(prefix, meta: dict, out_dir: str | Path) -> None:
    """graph_prefix.json (prompt + encoder settings) and, with a graph side, graph_prefix.safetensors (fp32)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if prefix is not None:
        sd = {k: v.detach().float().cpu().contiguous() for k, v in prefix.state_dict().items()}
        save_file(sd, str(out / PREFIX_FILE))
    (out / PREFIX_META).write_text(json.dumps(meta, indent=1))


def _gathered(params):
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def load_prefix(export_dir: str | Path, llm_hidden: int):
    """(GraphPrefix or None, meta) saved by MoleculeTask.save_extra; (None, {}) when the export has none."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    if not (d / PREFIX_META).exists():
        return None, {}
    meta = json.loads((d / PREFIX_META).read_text())
    if not meta.get("use_graph", True) or not (d / PREFIX_FILE).exists():
        return None, meta
    prefix = build_prefix(meta, llm_hidden)
    prefix.load_state_dict(load_file(str(d / PREFIX_FILE)))
    return prefix.eval(), meta
