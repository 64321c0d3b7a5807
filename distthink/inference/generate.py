"""Batched generation with thinking, and the reasoning / answer split (`distthink generate`, free mode, evals).

    gen = load_generator("runs/mol/export")            # an export dir, or a checkpoint dir (non-ZeRO-3)
    records = gen.generate(messages_list, graphs_list, GenerationOptions(enable_thinking=True, max_think_tokens=64))

Every prompt goes through the model's own chat template (`enable_thinking` on/off) and is left-padded;
the decoder always runs from `inputs_embeds` (token embeddings with graph vectors injected at `<|graph|>`
tokens when the model has a graph encoder), so text-only and graph-conditioned prompts take one path.
Greedy or sampled decoding (temperature, top_p, top_k) through transformers' `generate`, with a thinking
budget: once a row has produced `max_think_tokens` tokens without `</think>`, `</think>` is forced next
(the row's thought then counts as closed by the budget: `think_budget_hit`). Under ZeRO-3 with several ranks
`GenerationOptions(synced_gpus=True)` keeps the ranks' decoder forwards in lockstep (transformers'
`synced_gpus`); a rank with nothing to generate must still call `generate_ids` (with a dummy prompt).

Records: `{id, reasoning, answer, raw, finish_reason, think_state, well_formed, num_new_tokens,
think_budget_hit, num_think_tokens}` via `distthink.inference.parse.parse_generation`. `finish_reason` is `stop` (end of turn
generated) or `length` (max_new_tokens reached).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from distthink.errors import CheckpointError, ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


@dataclass
class GenerationOptions:
    enable_thinking: bool = False
    do_sample: bool = False            # False = greedy
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 = off
    max_new_tokens: int = 256
    max_think_tokens: int | None = None  # thinking budget (tokens before </think>); None = no budget
    batch_size: int = 8
    seed: int = 0
    # Every rank runs the same number of decoder forwards, finished ranks doing dummy ones, until all ranks are
    # done (transformers' `synced_gpus`: one all_reduce of a "still running" flag per decode step). Needed when
    # the weights are partitioned (ZeRO-3): each forward all-gathers them, a collective every rank must join.
    # None = transformers decides (ZeRO-3 / FSDP with more than one rank).
    synced_gpus: bool | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("generation: max_new_tokens and batch_size must be >= 1. Fix: positive values")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ConfigError(f"generation: temperature={self.temperature} top_p={self.top_p} top_k={self.top_k}. "
                              "Fix: temperature > 0, 0 < top_p <= 1, top_k >= 0")
        if self.max_think_tokens is not None and self.max_think_tokens < 0:
            raise ConfigError("generation: max_think_tokens must be >= 0 (or None). Fix: a budget in tokens")


class ThinkBudget:
    """LogitsProcessor: force `</think>` in rows whose thought reached `max_think` tokens unclosed.

    `input_ids` seen by the processor are the generated tokens only (generation from inputs_embeds), so the
    thought length of a row is its number of generated tokens before its first `</think>`.
    """

    def __init__(self, think_end_id: int, max_think: int):
        self.end, self.max = think_end_id, max_think
        self.hit: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        closed = (input_ids == self.end).any(dim=1)
        force = (~closed) & (input_ids.shape[1] >= self.max)
        if self.hit is None:
            self.hit = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        if bool(force.any()):
            self.hit |= force
            forced = torch.full_like(scores[force], float("-inf"))
            forced[:, self.end] = 0.0
            scores = scores.clone()
            scores[force] = forced
        return scores


class Generator:
    """A causal LM (+ optional graph prefix) and its tokenizer, ready for batched generation."""

    def __init__(self, model, tokenizer, prefix=None, graph_token_id: int | None = None, meta: dict | None = None):
        self.model, self.tokenizer, self.prefix = model, tokenizer, prefix
        self.graph_token_id = graph_token_id
        self.meta = meta or {}
        self.stop_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                     tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.pad_token_id}
                         if isinstance(i, int) and i != tokenizer.unk_token_id]
        self.think_end_id = tokenizer.convert_tokens_to_ids("</think>")
        if self.think_end_id == tokenizer.unk_token_id:
            self.think_end_id = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    def render(self, messages: list[dict], enable_thinking: bool) -> str:
        msgs = [m for m in messages if m["role"] != "assistant"] if messages[-1]["role"] == "assistant" else messages
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)

    @torch.no_grad()
    def generate_batch(self, messages: Sequence[list[dict]], graphs: Sequence[list] | None,
                       opts: GenerationOptions) -> list[dict]:
        """One batch: messages (chats; a trailing assistant turn is dropped), graphs[i] = the Data graphs of
        prompt i's `<|graph|>` groups (or None for text-only). Returns one record per prompt."""
        from distthink.inference.parse import parse_generation

        tok = self.tokenizer
        prompts = [self.render(m, opts.enable_thinking) for m in messages]
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        out, budget = self.generate_ids(ids, graphs, opts)
        records = []
        for row, prompt in enumerate(prompts):
            gen = out[row]
            stop_at = next((i for i, t in enumerate(gen) if t in self.stop_ids), None)
            finish = "stop" if stop_at is not None else "length"
            gen = gen[:stop_at] if stop_at is not None else gen
            text = tok.decode(gen, skip_special_tokens=False)
            parsed = parse_generation(text, finish_reason=finish,
                                      prompt_opened_think=prompt.rstrip().endswith("<think>"))
            rec = parsed.to_dict()
            rec["num_new_tokens"] = len(gen)
            # tokens generated before the first </think> (None when the row never closed a thought)
            rec["num_think_tokens"] = gen.index(self.think_end_id) if self.think_end_id in gen else None
            rec["think_budget_hit"] = bool(budget is not None and budget.hit is not None and budget.hit[row])
            records.append(rec)
        return records

    @torch.no_grad()
    def generate_ids(self, ids: Sequence[list[int]], graphs: Sequence[list] | None, opts: GenerationOptions):
        """Token-level batch generation: ids[i] = prompt token ids (left-padded here), graphs[i] = its graphs.

        Returns (generated ids per row, right-padded with pad, as lists; the ThinkBudget or None)."""
        from transformers import LogitsProcessorList

        from distthink.tasks.molecule.task import molecule_inputs_embeds

        tok = self.tokenizer
        L = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        input_ids = torch.tensor([[pad] * (L - len(x)) + list(x) for x in ids], device=self.device)
        mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids], device=self.device)
        graph_batch, counts = None, None
        if graphs is not None and any(graphs):
            from distthink.tasks.molecule.encoder import collate_sample_graphs

            if self.prefix is None:
                raise ConfigError("graphs were given but the model has no graph encoder. Fix: generate from the "
                                  "export of a molecule run (graph_prefix.* next to the model)")
            graph_batch, counts = collate_sample_graphs([g or [] for g in graphs])
            counts = counts.to(self.device)
        embeds = molecule_inputs_embeds(self.model, self.prefix, input_ids, self.graph_token_id, graph_batch, counts)
        procs, budget = [], None
        if opts.enable_thinking and opts.max_think_tokens is not None and self.think_end_id is not None:
            budget = ThinkBudget(self.think_end_id, opts.max_think_tokens)
            procs.append(budget)
        kwargs = dict(max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample, pad_token_id=pad,
                      eos_token_id=self.stop_ids, use_cache=True, logits_processor=LogitsProcessorList(procs))
        if opts.synced_gpus is not None:
            kwargs["synced_gpus"] = opts.synced_gpus
        if opts.do_sample:
            kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return out.tolist(), budget

    def generate(self, messages: Sequence[list[dict]], graphs: Sequence[list] | None = None,
                 opts: GenerationOptions | None = None, *, ids: Sequence | None = None,
                 progress: bool = False) -> Iterator[dict]:
        """Yield one record per prompt, in order, batch by batch (so callers can stream them)."""
        from tqdm.auto import tqdm

        opts = opts or GenerationOptions()
        opts.validate()
        torch.manual_seed(opts.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with tqdm(total=len(messages), disable=not progress, desc="generate", dynamic_ncols=True) as bar:
                for start in range(0, len(messages), opts.batch_size):
                    sl = slice(start, start + opts.batch_size)
                    recs = self.generate_batch(messages[sl], graphs[sl] if graphs is not None else None, opts)
                    for j, rec in enumerate(recs):
                        i = start + j
                        yield {"id": ids[i] if ids is not None else i, **rec}
                    bar.update(len(recs))
        finally:
            self.model.train(was_training)


def load_generator(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Generator:
    """From an export dir (full model or PEFT adapter, + graph_prefix.* of a molecule run) or a checkpoint dir
    (`checkpoints/step-N` of a non-ZeRO-3 run: rebuilt from its config.yaml)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory. Fix: give a run's export/ or checkpoints/step-N directory")
    if (p / "config.yaml").exists() and (p / "trainer_state.json").exists():
        return _from_checkpoint(p, device, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distthink.tasks.molecule.task import GRAPH_TOKEN, load_prefix

    tokenizer = AutoTokenizer.from_pretrained(str(p))
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = p / "base_model" if (p / "base_model").exists() else None
        if base_dir is None:
            cfg = json.loads((p / "adapter_config.json").read_text())
            base_dir = cfg.get("base_model_name_or_path")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
        model = PeftModel.from_pretrained(base, str(p)).merge_and_unload()
    elif (p / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        raise CheckpointError(f"{p} holds neither a model (config.json), an adapter (adapter_config.json) nor a "
                              "distthink checkpoint (config.yaml + trainer_state.json). Fix: point at export/ or "
                              "checkpoints/step-N of a run")
    model.to(device).eval()
    prefix, meta = load_prefix(p, model.config.hidden_size)
    gid = None
    if prefix is not None:
        prefix.to(device=device, dtype=dtype)
        gid = tokenizer.convert_tokens_to_ids(meta.get("graph_token", GRAPH_TOKEN))
    return Generator(model, tokenizer, prefix, gid, meta)


def _from_checkpoint(p: Path, device: str, dtype: torch.dtype) -> Generator:
    from safetensors.torch import load_file

    from distthink.config import load_config
    from distthink.models.load import base_causal_lm, load_model, load_tokenizer
    from distthink.engine.task import make_task

    if not (p / "model.safetensors").exists():
        raise CheckpointError(f"{p} has no model.safetensors (a ZeRO-3 checkpoint keeps sharded weights). Fix: "
                              "generate from the run's export/ (checkpoint.export=full or adapter)")
    cfg = load_config(p / "config.yaml", ["distributed.deepspeed=null"])
    tokenizer = load_tokenizer(cfg)
    task = make_task(cfg)
    task.prepare_tokenizer(tokenizer)
    model = load_model(cfg, tokenizer, device, dtype)
    wrapped = task.wrap_model(model, tokenizer)
    missing, unexpected = wrapped.load_state_dict(load_file(str(p / "model.safetensors")), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied weights are saved once
    if real_missing or unexpected:
        raise CheckpointError(f"{p}: checkpoint does not match its config (missing {real_missing[:3]}, unexpected "
                              f"{unexpected[:3]}). Fix: use the export of the run")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    lm = base_causal_lm(model).to(device).eval()
    lm.config.use_cache = True
    prefix = getattr(wrapped, "prefix", None)
    meta = task.prompt_meta() if hasattr(task, "prompt_meta") else {}
    return Generator(lm, tokenizer, prefix.eval() if prefix is not None else None,
                     getattr(task, "graph_token_id", None), meta)


def write_jsonl(records: Iterator[dict], path: str | Path) -> int:
    """Stream records to a JSONL file (flushed per record); returns how many were written."""
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            n += 1
    return n
