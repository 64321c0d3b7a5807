"""Batched generation with thinking, and the reasoning / answer split (`distthink generate`, free mode, evals).

    gen = load_generator("runs/sft/export")            # an export dir, or a checkpoint dir (non-ZeRO-3)
    records = gen.generate(messages_list, opts=GenerationOptions(enable_thinking=True, max_think_tokens=64))

Every prompt goes through the model's own chat template (`enable_thinking` on/off) and is left-padded;
the decoder always runs from `inputs_embeds`. A task whose prompts carry more than text (molecule graphs at
`<|graph|>` tokens, CF vectors at id tokens) gives the generator a `PromptInputs` hook that builds those
embeddings from each prompt's side inputs (`extras`); without one they are the plain token embeddings. This
module knows no task: the hook is the task's.
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
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from peft import PeftModel
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from distthink.config import load_config, resolve_attention
from distthink.engine.task import make_task
from distthink.errors import CheckpointError, ConfigError
from distthink.inference.parse import parse_generation
from distthink.logging_utils import get_logger
from distthink.models.load import base_causal_lm, load_model, load_tokenizer

log = get_logger(__name__)


@dataclass
class GenerationOptions:
    enable_thinking: bool = False
    do_sample: bool = False            # False = greedy
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 = off
    max_new_tokens: int = 256
    min_new_tokens: int = 0            # end of turn forbidden before this many new tokens (0 = off)
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
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"generation: min_new_tokens={self.min_new_tokens} must be in 0..max_new_tokens="
                              f"{self.max_new_tokens}. Fix: a smaller min_new_tokens")
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


class PromptInputs(Protocol):
    """A task's hook that turns a batch of prompts plus their side inputs into decoder input embeddings.
    A hook may list `placeholder_ids` (its input-slot tokens): the generator never samples them."""

    def inputs_embeds(self, model, input_ids: torch.Tensor, extras: Sequence[Any] | None) -> torch.Tensor:
        """(B, T) left-padded prompt ids + one side input per prompt (or None) -> (B, T, H) embeddings."""
        ...


class TokenEmbeddings:
    """The default hook: the model's own token embeddings; prompts with side inputs are refused."""

    def inputs_embeds(self, model, input_ids: torch.Tensor, extras: Sequence[Any] | None) -> torch.Tensor:
        if extras is not None and any(extras):
            raise ConfigError("the prompts carry side inputs (e.g. molecule graphs) but the generator has no hook "
                              "for them. Fix: generate from the export of a run of that task (for molecules: "
                              "graph_prefix.* next to the model)")
        return model.get_input_embeddings()(input_ids)


#: (export_dir, model, tokenizer, device, dtype) -> (PromptInputs or None, prompt settings): a task's loader of
#: the hook stored in its export (the molecule task's graph encoder), given to `load_generator`.
PromptInputsLoader = Callable[[Path, Any, Any, str, torch.dtype], "tuple[PromptInputs | None, dict]"]


class Generator:
    """A causal LM and its tokenizer, ready for batched generation; `prompt_inputs` builds task inputs."""

    def __init__(self, model, tokenizer, prompt_inputs: PromptInputs | None = None, meta: dict | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_inputs = prompt_inputs or TokenEmbeddings()
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
    def generate_batch(self, messages: Sequence[list[dict]], extras: Sequence[Any] | None,
                       opts: GenerationOptions) -> list[dict]:
        """One batch: messages (chats; a trailing assistant turn is dropped), extras[i] = prompt i's side inputs
        for the prompt-inputs hook (e.g. the graphs of its `<|graph|>` groups), or None. One record per prompt."""
        tok = self.tokenizer
        prompts = [self.render(m, opts.enable_thinking) for m in messages]
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        out, budget = self.generate_ids(ids, extras, opts)
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
    def generate_ids(self, ids: Sequence[list[int]], extras: Sequence[Any] | None, opts: GenerationOptions):
        """Token-level batch generation: ids[i] = prompt token ids (left-padded here), extras[i] = its side inputs.

        Returns (generated ids per row, right-padded with pad, as lists; the ThinkBudget or None)."""
        out, budget, _ = self._generate(ids, extras, opts, first_logits=False)
        return out, budget

    @torch.no_grad()
    def generate_ids_with_first_logits(self, ids: Sequence[list[int]], extras: Sequence[Any] | None,
                                       opts: GenerationOptions):
        """generate_ids + the raw logits (B, V) float32 of the first generated position, before any processor
        or sampling warper: what the model predicts right after each prompt (a task can read a scored token's
        logit from it without a second forward)."""
        return self._generate(ids, extras, opts, first_logits=True)

    def _generate(self, ids, extras, opts: GenerationOptions, first_logits: bool):
        tok = self.tokenizer
        L = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        input_ids = torch.tensor([[pad] * (L - len(x)) + list(x) for x in ids], device=self.device)
        mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids], device=self.device)
        embeds = self.prompt_inputs.inputs_embeds(self.model, input_ids, extras)
        procs, budget = [], None
        if opts.enable_thinking and opts.max_think_tokens is not None and self.think_end_id is not None:
            budget = ThinkBudget(self.think_end_id, opts.max_think_tokens)
            procs.append(budget)
        kwargs = dict(max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample, pad_token_id=pad,
                      eos_token_id=self.stop_ids, use_cache=True, logits_processor=LogitsProcessorList(procs))
        placeholders = list(getattr(self.prompt_inputs, "placeholder_ids", ()))
        if placeholders:  # input slots (`<|graph|>`), never outputs: a generated one would need a vector to fill it
            kwargs["suppress_tokens"] = placeholders
        if opts.min_new_tokens:
            kwargs["min_new_tokens"] = opts.min_new_tokens
        if opts.synced_gpus is not None:
            kwargs["synced_gpus"] = opts.synced_gpus
        if opts.do_sample:
            kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if not first_logits:
            out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            return out.tolist(), budget, None
        res = self.model.generate(inputs_embeds=embeds, attention_mask=mask, return_dict_in_generate=True,
                                  output_logits=True, **kwargs)
        return res.sequences.tolist(), budget, res.logits[0].float()

    def generate(self, messages: Sequence[list[dict]], extras: Sequence[Any] | None = None,
                 opts: GenerationOptions | None = None, *, ids: Sequence | None = None,
                 progress: bool = False) -> Iterator[dict]:
        """Yield one record per prompt, in order, batch by batch (so callers can stream them)."""
        opts = opts or GenerationOptions()
        opts.validate()
        torch.manual_seed(opts.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with tqdm(total=len(messages), disable=not progress, desc="generate", dynamic_ncols=True) as bar:
                for start in range(0, len(messages), opts.batch_size):
                    sl = slice(start, start + opts.batch_size)
                    recs = self.generate_batch(messages[sl], extras[sl] if extras is not None else None, opts)
                    for j, rec in enumerate(recs):
                        i = start + j
                        yield {"id": ids[i] if ids is not None else i, **rec}
                    bar.update(len(recs))
        finally:
            self.model.train(was_training)


def load_generator(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   prompt_inputs_loader: PromptInputsLoader | None = None) -> Generator:
    """From an export dir (full model or PEFT adapter) or a checkpoint dir (`checkpoints/step-N` of a non-ZeRO-3
    run: rebuilt from its config.yaml through its task). `prompt_inputs_loader` reads a task's side modules
    stored next to an exported model (the molecule task's graph encoder); a checkpoint knows its task itself.
    The model computes in `dtype` on `device`, with the attention that can run there (config.resolve_attention)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory. Fix: give a run's export/ or checkpoints/step-N directory")
    if (p / "config.yaml").exists() and (p / "trainer_state.json").exists():
        return _from_checkpoint(p, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    attn = resolve_attention("auto", str(torch.device(device).type), dtype)
    if (p / "adapter_config.json").exists():
        base_dir = p / "base_model" if (p / "base_model").exists() else None
        if base_dir is None:
            cfg = json.loads((p / "adapter_config.json").read_text())
            base_dir = cfg.get("base_model_name_or_path")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation=attn)
        model = PeftModel.from_pretrained(base, str(p)).merge_and_unload()
    elif (p / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, attn_implementation=attn)
    else:
        raise CheckpointError(f"{p} holds neither a model (config.json), an adapter (adapter_config.json) nor a "
                              "distthink checkpoint (config.yaml + trainer_state.json). Fix: point at export/ or "
                              "checkpoints/step-N of a run")
    model.to(device).eval()
    hook, meta = (None, {}) if prompt_inputs_loader is None else prompt_inputs_loader(p, model, tokenizer, device,
                                                                                      dtype)
    _log_placement(p, model)
    return Generator(model, tokenizer, hook, meta)


def _log_placement(path: Path, model) -> None:
    w = next(model.parameters())
    log.info("generator: %s on %s in %s, attention=%s", path, w.device, str(w.dtype).replace("torch.", ""),
             getattr(model.config, "_attn_implementation", "?"))


def _from_checkpoint(p: Path, device: str, dtype: torch.dtype) -> Generator:
    if not (p / "model.safetensors").exists():
        raise CheckpointError(f"{p} has no model.safetensors (a ZeRO-3 checkpoint keeps sharded weights). Fix: "
                              "generate from the run's export/ (checkpoint.export=full or adapter)")
    cfg = load_config(p / "config.yaml", ["distributed.deepspeed=null"])
    tokenizer = load_tokenizer(cfg)
    task = make_task(cfg)
    task.prepare_tokenizer(tokenizer)
    model = load_model(cfg, tokenizer, str(torch.device(device).type), dtype)
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
    _log_placement(p, lm)
    # optional task hook: (PromptInputs, prompt settings) from the wrapped module's side modules
    hook, meta = task.prompt_inputs(wrapped) if hasattr(task, "prompt_inputs") else (None, {})
    return Generator(lm, tokenizer, hook, meta)


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
