"""Tiled decoder MLPs for very long rows (`model.tiled_mlp`), on DeepSpeed ALST's sequence-tiled compute.

A decoder MLP holds (tokens x intermediate_size) activations several times over (gate, up, their product), about
3x the hidden states of the layer: at 64k tokens of Qwen3-8B (intermediate 12288) that is ~4.5 GiB per layer in
bf16 during the forward. `deepspeed.runtime.sequence_parallel.ulysses_sp.sequence_tiled_compute` runs the MLP over
consecutive tiles of the row under no_grad and recomputes each tile in backward, so those activations exist for
one tile at a time (the price: one more MLP forward per step).

`sequence_tiled_compute` is used rather than ALST's `TiledMLP` because it makes exactly `tiles` calls whatever the
row length (`TiledMLP` uses torch.chunk, which makes fewer chunks for short rows): under ZeRO-3 every call
gathers the MLP weights, a collective, so every rank must make the same number of calls.
"""

from __future__ import annotations

import torch

from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


def _tiled_forward(mlp: torch.nn.Module, tiles: int):
    plain = mlp.forward  # the class's forward, bound: calls the (possibly LoRA-wrapped) projections

    def forward(x: torch.Tensor) -> torch.Tensor:
        # DeepSpeed only: imported when a tiled MLP first runs
        from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

        params = [p for p in mlp.parameters() if p.requires_grad]
        return sequence_tiled_compute(plain, x.shape[1], tiles, {"x": x}, {}, "x", compute_params=params,
                                      output_unshard_dimension=1, output_reduction=None)

    return forward


def tile_mlps(model: torch.nn.Module, tiles: int) -> int:
    """Make every decoder layer's MLP of a transformers causal LM run in `tiles` sequence tiles. Returns how many
    MLPs were tiled; tiles <= 1 leaves the model as it is."""
    if tiles <= 1:
        return 0
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ConfigError(f"model.tiled_mlp={tiles}: {type(model).__name__} has no model.layers[i].mlp to tile. "
                          "Fix: set model.tiled_mlp=0 for this architecture")
    for layer in layers:
        layer.mlp.forward = _tiled_forward(layer.mlp, tiles)
    log.info("tiled MLP: %d decoder MLPs run in %d sequence tiles (recomputed in backward)", len(layers), tiles)
    return len(layers)
