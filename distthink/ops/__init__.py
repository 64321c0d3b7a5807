"""Fused ops: `fused_linear_cross_entropy` (per-token and dynamic weights, torch and Liger paths)."""

from distthink.ops.flce import (
                                FLCEStats,
                                auto_chunk_size,
                                auto_tile_width,
                                fused_linear_cross_entropy,
                                gathered_lm_head,
                                selected_logits,
)

__all__ = ["FLCEStats", "auto_chunk_size", "auto_tile_width", "fused_linear_cross_entropy", "gathered_lm_head", "selected_logits"]
