"""The molecule wrapper (LM + graph encoder/projector on the engine's LM-head loss part), the graph prefix's
export, and the prompt-inputs hook that lets the generic generator put graph vectors at `<|graph|>` tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distthink.engine.lm_loss import LMHeadLoss
from distthink.errors import ConfigError, DistthinkError
from distthink.logging_utils import get_logger
from distthink.models.inject import PlaceholderSlot, inject_placeholders
from distthink.tasks.molecule.encoder import GraphEncoder, GraphPrefix, collate_sample_graphs
from distthink.tasks.molecule.options import GRAPH_TOKEN
from distthink.zero3 import full_numel, is_partitioned

log = get_logger(__name__)


PREFIX_FILE = "graph_prefix.safetensors"
PREFIX_META = "graph_prefix.json"


def build_prefix(graph_cfg: dict, llm_hidden: int):
    """GraphEncoder + projector from a graph config dict (MoleculeOptions.graph_config / graph_prefix.json)."""
    enc = GraphEncoder(hidden=graph_cfg["hidden"], num_layers=graph_cfg["num_layers"], conv=graph_cfg["conv"],
                       pool=graph_cfg["pool"], dropout=graph_cfg["dropout"])
    return GraphPrefix(enc, llm_hidden, k=graph_cfg["graph_tokens"], mult=graph_cfg["proj_mult"])


def molecule_inputs_embeds(model, prefix, input_ids: torch.Tensor, graph_token_id: int | None, graph_batch,
                           graphs_per_sample: torch.Tensor | None, segment_ids: torch.Tensor | None = None):
    """(B, T, H) inputs_embeds: the LM's token embeddings with projected graph vectors at `<|graph|>` tokens.

    Calls the embedding *module* (not its weight), so ZeRO-3 gathers it; with no graphs (text-only prompts)
    it is the plain embedding.
    """
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


class MoleculeModel(LMHeadLoss):
    """The module the trainer prepares: LM (`.model`, possibly PEFT) + `.prefix` (GraphPrefix or None).

    forward(batch pieces) -> 0-d float32 weighted loss sum (unnormalised), through the engine's LM-head loss
    part with optional dynamic weights (after-`</think>` counting).
    """

    def __init__(self, model, prefix, graph_token_id: int | None, *, impl: str, chunk_size: int,
                 dynamic: str | None, think_end_id: int | None):
        super().__init__(model, impl=impl, chunk_size=chunk_size, dynamic=dynamic, think_end_id=think_end_id)
        self.prefix = prefix
        self.graph_token_id = graph_token_id
        self._logged = prefix is None

    def forward(self, input_ids, targets, target_weights, segment_ids, graph_batch, graphs_per_sample,
                **model_kwargs) -> torch.Tensor:
        if not self._logged:  # at the first forward: the engine has partitioned the prefix by now (ZeRO-3)
            self._logged = True
            params = list(self.prefix.parameters())
            log.info("graph encoder + projector: %d params, partitioned by ZeRO-3: %s",
                     sum(full_numel(p) for p in params), is_partitioned(params))
        embeds = molecule_inputs_embeds(self.model, self.prefix, input_ids, self.graph_token_id, graph_batch,
                                        graphs_per_sample, segment_ids=segment_ids)
        loss, _ = self.head_loss(targets, target_weights, {"inputs_embeds": embeds, **model_kwargs},
                                 segment_ids=segment_ids, position_ids=model_kwargs["position_ids"])
        return loss



def save_prefix(prefix, meta: dict, out_dir: str | Path) -> None:
    """graph_prefix.json (prompt + encoder settings) and, with a graph side, graph_prefix.safetensors (fp32)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if prefix is not None:
        sd = {k: v.detach().float().cpu().contiguous() for k, v in prefix.state_dict().items()}
        save_file(sd, str(out / PREFIX_FILE))
    (out / PREFIX_META).write_text(json.dumps(meta, indent=1))


def load_prefix(export_dir: str | Path, llm_hidden: int):
    """(GraphPrefix or None, meta) saved by MoleculeTask.save_extra; (None, {}) when the export has none."""
    d = Path(export_dir)
    if not (d / PREFIX_META).exists():
        return None, {}
    meta = json.loads((d / PREFIX_META).read_text())
    if not meta.get("use_graph", True) or not (d / PREFIX_FILE).exists():
        return None, meta
    prefix = build_prefix(meta, llm_hidden)
    prefix.load_state_dict(load_file(str(d / PREFIX_FILE)))
    return prefix.eval(), meta


class GraphPromptInputs:
    """The generator's prompt-inputs hook for molecules (distthink.inference.generate.PromptInputs): each prompt's
    graphs go through the graph encoder + projector onto its `<|graph|>` tokens.

    The prefix follows the prompts to their device at every call, so a generator moved to the GPU after it was
    built (or built from a CPU checkpoint) never feeds a GPU graph batch to CPU tables."""

    def __init__(self, prefix, graph_token_id: int | None):
        self.prefix, self.graph_token_id = prefix, graph_token_id
        # `<|graph|>` is an input slot: a thought that generated one could not be trained on (no graph to fill it)
        self.placeholder_ids = (graph_token_id,) if graph_token_id is not None else ()

    def inputs_embeds(self, model, input_ids: torch.Tensor, extras) -> torch.Tensor:
        graph_batch, counts = None, None
        if extras is not None and any(extras):
            if self.prefix is None:
                raise ConfigError("graphs were given but the model has no graph encoder. Fix: generate from the "
                                  "export of a molecule run (graph_prefix.* next to the model)")
            graph_batch, counts = collate_sample_graphs([g or [] for g in extras])
            counts = counts.to(input_ids.device)
            self.prefix.to(input_ids.device)
        return molecule_inputs_embeds(model, self.prefix, input_ids, self.graph_token_id, graph_batch, counts)


def load_graph_prompt_inputs(export_dir: Path, model, tokenizer, device: str, dtype: torch.dtype):
    """`load_generator`'s prompt_inputs_loader for molecule exports: (GraphPromptInputs, graph_prefix.json)."""
    prefix, meta = load_prefix(export_dir, model.config.hidden_size)
    if prefix is None:
        return None, meta
    prefix.to(device=device, dtype=dtype)
    return GraphPromptInputs(prefix, tokenizer.convert_tokens_to_ids(meta.get("graph_token", GRAPH_TOKEN))), meta
