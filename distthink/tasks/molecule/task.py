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
- `supervise`: rows carry `reasoning_content`; encode_chat learns reasoning + description (data.policy).
- `free`: on-policy thoughts. `on_step_start` (trainer hook) samples `<think>…` with the current model for the
  step's samples (budget `max_think_tokens`, regenerated when `regen_every` steps old), closes and counts
  unfinished thoughts, appends the gold description and learns only it (thought weight 0). Under ZeRO-3 the
  generation is collective (synchronised ranks, dummy forwards on ranks that are done or have nothing stale).

Options are validated by `MoleculeOptions`; see docs/molecules.md for the table.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch_geometric.data import Data

from distthink.config import Config, training_autocast
from distthink.data.cache import Column
from distthink.data.chat import META_COLUMNS, encode_chat
from distthink.data.dataset import iter_records
from distthink.data.parallel_encode import SplitEncoding
from distthink.data.types import IGNORE_INDEX, EncodedSample
from distthink.engine import batching as train_data
from distthink.engine import distributed as dist
from distthink.errors import ConfigError, DataError, DistthinkError
from distthink.inference.generate import GenerationOptions, Generator
from distthink.inference.parse import close_thoughts
from distthink.logging_utils import get_logger
from distthink.models.attention import model_inputs
from distthink.models.inject import add_placeholder_tokens
from distthink.models.load import base_causal_lm, side_module_dtype
from distthink.tasks.molecule.demo import ASSET_DIR, SPLIT_FILES, caption_messages
from distthink.tasks.molecule.encoder import collate_sample_graphs
from distthink.tasks.molecule.graphs import smiles_to_graph
from distthink.tasks.molecule.model import GraphPromptInputs, MoleculeModel, build_prefix, save_prefix
from distthink.tasks.molecule.options import GRAPH_TOKEN, MoleculeOptions
from distthink.tasks.sft import SFTTask
from distthink.zero3 import gathered, is_partitioned

log = get_logger(__name__)


#: encode_chat's meta plus the molecule side inputs. Graphs are stored as their feature arrays (`pack_graphs`),
#: the on-policy thoughts of think_mode=free as token lists.
COLUMNS = META_COLUMNS + (
    Column("id", "json"), Column("graph_dims", "ints", "int32"), Column("graph_x", "ints", "int32"),
    Column("graph_edge_index", "ints", "int32"), Column("graph_edge_attr", "ints", "int32"),
    Column("graph_smiles", "json"),
    Column("free_prompt", "ints", "int32"), Column("free_tail", "ints", "int32"), Column("free_tail_weights", "floats"),
    Column("free_end", "int"), Column("free_step", "int"), Column("free_think_len", "int"),
    Column("free_closed_by_us", "bool"),
)
#: The options that change what a record encodes to (they key the split's cache entry).
ENCODING_OPTIONS = ("think_mode", "use_graph", "include_smiles", "graph_tokens")


def split_path(spec: str, split: str) -> Path:
    """The JSONL of a split: `bundled`/`demo` = the shipped demo set (eval -> its test split), else the file."""
    if spec in ("bundled", "demo"):
        return ASSET_DIR / SPLIT_FILES["train" if split == "train" else "test"]
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"data.{split}='{spec}' does not exist. Fix: a JSONL of {{smiles, description}} rows, "
                          "or `bundled` for the demo molecules")
    return path


def read_records(path: Path, supervise: bool):
    """Stream (source, line, record) of a molecule JSONL. think_mode=supervise needs reasoning on every row: a row
    without it stops the encoding (it is the wrong data for the mode, not a bad row)."""
    for src, line, rec in iter_records(path):
        if supervise and isinstance(rec, dict) and not rec.get("reasoning_content"):
            raise DataError("row has no reasoning_content", source=src, line=line, field="reasoning_content",
                            fix="think_mode=supervise needs reasoning per row; use think_mode=dynamic otherwise")
        yield src, line, rec


def messages(opts: MoleculeOptions, rec: dict) -> list[dict]:
    msgs = caption_messages(rec["smiles"], rec["description"], use_graph=opts.use_graph, k=opts.graph_tokens,
                            include_smiles=opts.include_smiles, thinking=opts.think_mode != "off")
    if opts.think_mode == "supervise":
        msgs[-1]["reasoning_content"] = rec.get("reasoning_content", "")
    return msgs


class MoleculeEncoder:
    """One `{smiles, description}` row -> one sample with its graph in meta["graphs"] (picklable: it runs in the
    cache's encoding workers). `id` is the row's own, else its 0-based line number."""

    def __init__(self, opts: MoleculeOptions, policy):
        self.opts, self.policy = opts, policy

    def __call__(self, tokenizer, source: str, line: int, rec) -> tuple[list, list]:
        if not isinstance(rec, dict):
            raise DataError("the row is not a JSON object", source=source, line=line, reason="not_an_object",
                            fix="one {smiles, description} object per line")
        for key in ("smiles", "description"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError("missing or empty field", source=source, line=line, field=key, reason=f"missing_{key}",
                                fix="every row needs a SMILES string and a description")
        graph = smiles_to_graph(rec["smiles"], row=line, source=source) if self.opts.use_graph else None
        sample = encode_chat(tokenizer, messages(self.opts, rec), policy=self.policy, source=source, line=line)
        sample.meta["graphs"] = [graph] if graph is not None else []
        sample.meta["id"] = rec.get("id", line - 1)
        if self.opts.think_mode == "free":
            sample = free_template(tokenizer, self.opts, sample, rec)
        return [sample], []


def pack_graphs(meta: dict) -> dict:
    """meta["graphs"] (torch_geometric Data) -> their feature arrays: per graph (nodes, node features, edges, edge
    features) in `graph_dims`, the flattened x / edge_index / edge_attr, and the canonical SMILES."""
    out = {k: v for k, v in meta.items() if k != "graphs"}
    graphs = meta.get("graphs", [])
    out["graph_dims"] = [d for g in graphs for d in (*g.x.shape, g.edge_attr.shape[0], g.edge_attr.shape[1])]
    out["graph_x"] = [v for g in graphs for v in g.x.reshape(-1).tolist()]
    out["graph_edge_index"] = [v for g in graphs for v in g.edge_index.reshape(-1).tolist()]
    out["graph_edge_attr"] = [v for g in graphs for v in g.edge_attr.reshape(-1).tolist()]
    out["graph_smiles"] = [g.smiles for g in graphs]
    return out


def unpack_graphs(meta: dict) -> dict:
    """The inverse of pack_graphs: meta["graphs"] as Data objects equal to the ones encoded."""
    out = {k: v for k, v in meta.items() if not k.startswith("graph_")}
    dims, graphs = meta.get("graph_dims", []), []
    x = torch.tensor(meta.get("graph_x", []), dtype=torch.long)
    ei = torch.tensor(meta.get("graph_edge_index", []), dtype=torch.long)
    ea = torch.tensor(meta.get("graph_edge_attr", []), dtype=torch.long)
    px = pe = pa = 0
    for j, smiles in enumerate(meta.get("graph_smiles", [])):
        n, fx, e, fe = dims[4 * j:4 * j + 4]
        graphs.append(Data(x=x[px:px + n * fx].view(n, fx), edge_index=ei[pe:pe + 2 * e].view(2, e),
                           edge_attr=ea[pa:pa + e * fe].view(e, fe), smiles=smiles, num_nodes=n))
        px, pe, pa = px + n * fx, pe + 2 * e, pa + e * fe
    out["graphs"] = graphs
    return out


def free_template(tokenizer, opts: MoleculeOptions, sample, rec: dict):
    """think_mode=free: split a thinking-mode encoding into prompt (+ opened `<think>`) and the gold tail after
    `</think>`.

    The initial sample (used before its first regeneration, never trained on in practice since the thought is
    generated at the first step that uses it) is prompt + empty thought + description."""
    tok = tokenizer
    prompt_text = tok.apply_chat_template(messages(opts, rec)[:2], tokenize=False, add_generation_prompt=True,
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
    weights = [0.0] * lead + [1.0 if lab != IGNORE_INDEX else 0.0 for lab in tail_labels[lead:]]
    meta = dict(sample.meta, free_prompt=prompt + opener, free_tail=tail, free_tail_weights=weights,
                free_end=end, free_step=None, free_think_len=0, free_closed_by_us=False)
    return free_sample(meta, [])


def free_sample(meta: dict, thought: list[int]):
    """prompt + `<think>\n` + thought + `</think>` + tail, learning only the tail's description."""
    head = meta["free_prompt"] + list(thought) + [meta["free_end"]]
    ids = head + meta["free_tail"]
    w = [0.0] * len(head) + meta["free_tail_weights"]
    labels = [t if wi > 0 else IGNORE_INDEX for t, wi in zip(ids, w)]
    return EncodedSample(input_ids=ids, labels=labels, loss_weights=w, meta=meta)


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
        self.graph_token_id = add_placeholder_tokens(tokenizer, [GRAPH_TOKEN])[GRAPH_TOKEN]

    def thinking(self) -> bool:
        return self.opts.think_mode != "off"

    def split_encoding(self, split: str, tokenizer, source: str | None = None) -> SplitEncoding:
        spec = source or (self.cfg.data.train if split == "train" else self.cfg.data.eval)
        path = split_path(spec, split)
        policy = dataclasses.replace(train_data.chat_policy(self.cfg), enable_thinking=self.thinking())
        supervise = self.opts.think_mode == "supervise"
        return SplitEncoding(sources=[str(path)], records=lambda: read_records(path, supervise),
                             encoder=MoleculeEncoder(self.opts, policy), policy=policy, columns=COLUMNS,
                             options={"task": "molecule", **{k: getattr(self.opts, k) for k in ENCODING_OPTIONS}},
                             code=("distthink.tasks.molecule.demo", "distthink.tasks.molecule.graphs"),
                             limit=train_data.split_limit(self.cfg, split), pack=pack_graphs, unpack=unpack_graphs,
                             stem=f"{path.stem}-molecule", describe=lambda data: f"molecule: {len(data)} samples "
                             f"(think_mode={self.opts.think_mode}, graph={self.opts.use_graph})")

    def on_step_start(self, step: int, model, train_set, indices: list[int]) -> None:
        """Trainer hook (optional): refresh the on-policy thoughts of the samples this step uses.

        A sample's thought is regenerated when it was never generated or is `regen_every` steps old; the
        current model samples `<think>…` after the prompt (thinking budget `max_think_tokens`), unclosed thoughts
        are closed and counted, the gold description is appended, and train_set[i] is replaced (in this process:
        the cached split keeps the replacement in memory, the cache on disk is never written).

        Under ZeRO-3 with several ranks this is collective: every rank must call it at the same step (the trainer
        does), whatever its own number of stale samples (0 included) and generation lengths."""
        if self.opts.think_mode != "free":
            return

        stale = [i for i in indices if train_set[i].meta["free_step"] is None
                 or step - train_set[i].meta["free_step"] >= self.opts.regen_every]
        synced = self._synced_generation(model)
        if synced:
            # Collective from here on: under ZeRO-3 every decoder forward all-gathers the partitioned weights,
            # so either all ranks generate (a rank with nothing stale runs a discarded dummy row) or none does.

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
            # Under the training forward's autocast: with fp32 weights of a 16-bit run the attention was chosen
            # for 16-bit compute (flash-attn refuses fp32), and the thoughts should come from the model as trained.
            with training_autocast(self.cfg, next(model.parameters()).device.type):
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
            train_set[i] = free_sample(meta, seq[:-1])  # close_thoughts ends each sequence with </think>
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
        return (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1 and is_partitioned(model))

    def _free_generator(self, model):
        if not hasattr(self, "_gen_tokenizer"):
            raise DistthinkError("free mode: the tokenizer is unknown (collator() was not called)")
        return Generator(model.model, self._gen_tokenizer, GraphPromptInputs(model.prefix, self.graph_token_id))

    def collator(self, tokenizer) -> Callable[[list], dict]:
        self._gen_tokenizer = tokenizer
        base = super().collator(tokenizer)

        def collate(samples: list) -> dict:
            batch = base(samples)
            batch["graph_batch"], batch["graphs_per_sample"] = collate_sample_graphs(
                [s.meta.get("graphs", []) for s in samples])
            return batch

        return collate

    # -- model -------------------------------------------------------------------------------------------
    def wrap_model(self, model, tokenizer) -> torch.nn.Module:
        if not self.opts.trains("llm"):
            model.requires_grad_(False)
        prefix = None
        if self.opts.use_graph:
            torch.manual_seed(self.cfg.train.seed + 7)  # identical graph-side init on every rank
            prefix = build_prefix(self.opts.graph_config(), base_causal_lm(model).config.hidden_size)
            prefix.to(side_module_dtype(model))  # one trainable dtype with the LM's (ZeRO-3), fp32 without DeepSpeed
            for name, part in (("encoder", prefix.encoder), ("projector", prefix.projector)):
                part.requires_grad_(self.opts.trains(name))
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
        loss_sum = wrapped(input_ids=batch["input_ids"], targets=batch["targets"],
                           target_weights=batch["target_weights"], segment_ids=batch["segment_ids"],
                           graph_batch=batch["graph_batch"], graphs_per_sample=batch["graphs_per_sample"],
                           **model_inputs(batch, attn_impl, dtype=dtype, with_input_ids=False))
        return {"lm": loss_sum}

    # -- export ------------------------------------------------------------------------------------------
    def prompt_inputs(self, wrapped) -> tuple[GraphPromptInputs, dict]:
        """Generation from a checkpoint (distthink.inference.generate): the graph side of the wrapped module."""
        prefix = wrapped.prefix.eval() if wrapped.prefix is not None else None
        return GraphPromptInputs(prefix, self.graph_token_id), self.prompt_meta()

    def prompt_meta(self) -> dict:
        """What a generator needs to rebuild this run's prompts and graph side (graph_prefix.json)."""
        return {**self.opts.graph_config(), "graph_token": GRAPH_TOKEN, "use_graph": self.opts.use_graph,
                "include_smiles": self.opts.include_smiles, "think_mode": self.opts.think_mode}

    def save_extra(self, accelerator, wrapped, out_dir: Path) -> None:
        """Collective: write the graph encoder + projector (and the prompt settings) next to the exported LM."""
        inner = accelerator.unwrap_model(wrapped)
        params = list(inner.prefix.parameters()) if inner.prefix is not None else []
        with gathered(params):
            if accelerator.is_main_process:
                save_prefix(inner.prefix, self.prompt_meta(), out_dir)
