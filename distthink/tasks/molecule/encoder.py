"""Graph encoder for molecules (GIN / GINE from torch_geometric) and its bridge into the LLM.

Input: a PyG ``Batch`` of graphs from :mod:`distthink.tasks.molecule.graphs` (categorical ``x`` (N, 6) and
``edge_attr`` (E, 3), ``batch`` (N,) graph index). Each categorical column has its own embedding table and the
columns are summed (the OGB "AtomEncoder" idea), which is the same as a linear layer on the one-hot features
but without materialising them.

- :class:`GraphEncoder`: L message-passing layers (GINE uses bond features, GIN ignores them), each
  ``conv -> LayerNorm -> ReLU -> dropout`` with a residual connection; outputs node states (N, h) and a pooled
  vector per graph (G, h). LayerNorm (not BatchNorm) keeps a graph's encoding independent of what else is in
  the batch, so packing and micro-batch size never change a molecule's vector.
- :class:`GraphPrefix`: encoder + :class:`~distthink.models.inject.Projector` -> k LLM-sized vectors per
  molecule, returned as a :class:`~distthink.models.inject.PlaceholderSlot` for ``<|graph|>`` tokens.
- :func:`collate_graphs`: list of ``Data`` -> ``Batch`` (PyG's own batching).
- :func:`collate_sample_graphs`: the graph side input of one packed micro-batch: the molecules of samples
  0..S-1 in order, as one ``Batch``, plus ``graphs_per_sample`` (S,) for the injection count check.

Both modules are plain ``nn.Module`` s: put them inside the module handed to the DeepSpeed engine and ZeRO-3
partitions their parameters like the rest; freezing is ``requires_grad_(False)`` on the part to freeze.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import GINConv, GINEConv, global_add_pool, global_max_pool, global_mean_pool

from distthink.errors import ConfigError, DistthinkError
from distthink.models.inject import PlaceholderSlot, Projector
from distthink.tasks.molecule.graphs import ATOM_DIMS, BOND_DIMS

if TYPE_CHECKING:
    from torch_geometric.data import Batch

__all__ = ["GraphEncoder", "GraphEncoding", "GraphPrefix", "collate_graphs", "collate_sample_graphs"]


class _CategoricalEncoder(nn.Module):
    """Sum of one embedding per categorical column: (M, C) long -> (M, hidden)."""

    def __init__(self, dims: Sequence[int], hidden: int):
        super().__init__()
        self.dims = list(dims)
        self.tables = nn.ModuleList(nn.Embedding(d, hidden) for d in self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != len(self.dims):
            raise DistthinkError(f"expected categorical features (M, {len(self.dims)}), got {tuple(x.shape)}. "
                                 "Fix: build graphs with distthink.tasks.molecule.graphs.smiles_to_graph.")
        out = self.tables[0](x[:, 0])
        for i in range(1, len(self.tables)):
            out = out + self.tables[i](x[:, i])
        return out


@dataclass
class GraphEncoding:
    """Encoder outputs. ``nodes`` (N, h): node states after the last layer; ``pooled`` (G, h): one vector per
    graph; ``batch`` (N,): graph index of each node."""

    nodes: torch.Tensor
    pooled: torch.Tensor
    batch: torch.Tensor


class GraphEncoder(nn.Module):
    """GIN / GINE molecule encoder.

    Args: ``hidden`` (h), ``num_layers`` (>=1), ``conv`` ('gine' uses bond features, 'gin' does not),
    ``pool`` ('mean' | 'add' | 'max'), ``dropout``.

    ``forward(batch)``: PyG Batch/Data with ``x`` (N, 6) long, ``edge_index`` (2, E), ``edge_attr`` (E, 3) long,
    ``batch`` (N,) (absent for a single Data) -> :class:`GraphEncoding`.
    """

    def __init__(self, hidden: int = 128, num_layers: int = 3, *, conv: Literal["gine", "gin"] = "gine",
                 pool: Literal["mean", "add", "max"] = "mean", dropout: float = 0.0):
        super().__init__()

        if num_layers < 1 or hidden < 1:
            raise ConfigError(f"graph encoder needs num_layers >= 1 and hidden >= 1, got {num_layers}, {hidden}. "
                              "Fix: set graph.num_layers / graph.hidden in the config.")
        if conv not in ("gine", "gin"):
            raise ConfigError(f"graph.conv must be 'gine' or 'gin', got {conv!r}.")
        if pool not in ("mean", "add", "max"):
            raise ConfigError(f"graph.pool must be 'mean', 'add' or 'max', got {pool!r}.")
        self.hidden, self.num_layers, self.conv_type, self.pool = hidden, num_layers, conv, pool
        self.atom_encoder = _CategoricalEncoder(ATOM_DIMS, hidden)
        self.bond_encoders = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for _ in range(num_layers):
            mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))
            if conv == "gine":
                self.bond_encoders.append(_CategoricalEncoder(BOND_DIMS, hidden))
                self.convs.append(GINEConv(mlp, train_eps=True, edge_dim=hidden))
            else:
                self.convs.append(GINConv(mlp, train_eps=True))
            self.norms.append(nn.LayerNorm(hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch) -> GraphEncoding:
        x, edge_index = batch.x, batch.edge_index
        graph_index = getattr(batch, "batch", None)
        if graph_index is None:
            graph_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        num_graphs = int(getattr(batch, "num_graphs", 1) or 1)
        h = self.atom_encoder(x)
        for layer in range(self.num_layers):
            if self.conv_type == "gine":
                e = self.bond_encoders[layer](batch.edge_attr)
                out = self.convs[layer](h, edge_index, e)
            else:
                out = self.convs[layer](h, edge_index)
            h = h + self.dropout(torch.relu(self.norms[layer](out)))  # residual keeps deep stacks trainable
        pool = {"mean": global_mean_pool, "add": global_add_pool, "max": global_max_pool}[self.pool]
        pooled = pool(h, graph_index, size=num_graphs)
        return GraphEncoding(nodes=h, pooled=pooled, batch=graph_index)


class GraphPrefix(nn.Module):
    """Graph encoder + projector: k LLM-embedding vectors per molecule, for ``<|graph|>`` placeholder tokens.

    ``forward(batch)`` -> (G, k, llm_hidden). :meth:`slot` wraps that as a PlaceholderSlot for
    :func:`~distthink.models.inject.inject_placeholders`; ``graphs_per_sample`` (S,) says how many molecules
    each packed sample holds (usually 1; 0 for a text-only sample), in sample order, so that a sample whose
    prompt lost its ``<|graph|>`` tokens to truncation is reported by index instead of shifting every molecule.
    """

    def __init__(self, encoder: GraphEncoder, llm_hidden: int, *, k: int = 1, mult: int = 10):
        super().__init__()
        self.encoder = encoder
        self.projector = Projector(encoder.hidden, llm_hidden, mult=mult, k=k)
        self.k = k

    def forward(self, batch) -> torch.Tensor:
        return self.projector(self.encoder(batch).pooled)

    def slot(self, batch, token_id: int, graphs_per_sample: torch.Tensor | None = None,
             name: str = "<|graph|>") -> PlaceholderSlot:
        return PlaceholderSlot(token_id=token_id, vectors=self(batch), counts=graphs_per_sample, name=name)


def collate_graphs(graphs: Sequence) -> Batch:
    """PyG ``Batch.from_data_list``; graph i of the list is graph i of the batch (``batch.batch`` == i)."""
    if len(graphs) == 0:
        raise DistthinkError("collate_graphs got no graphs. Fix: only build a graph batch for micro-batches that "
                             "contain molecules.")
    return Batch.from_data_list(list(graphs))


def collate_sample_graphs(graphs_per_sample: Sequence[Sequence]) -> tuple[Batch | None, torch.Tensor]:
    """Side input of a packed micro-batch with S samples.

    ``graphs_per_sample[s]``: the ``Data`` graphs of sample s, in the order their ``<|graph|>`` groups appear in
    its prompt (usually one; empty for a text-only sample). Returns ``(batch, counts)``: one PyG ``Batch`` of
    all graphs, sample-major (None when the micro-batch has no molecule), and ``counts`` (S,) long, to pass as
    ``graphs_per_sample`` to :meth:`GraphPrefix.slot`.
    """
    counts = torch.tensor([len(g) for g in graphs_per_sample], dtype=torch.long)
    flat = [g for sample in graphs_per_sample for g in sample]
    return (collate_graphs(flat) if flat else None), counts
