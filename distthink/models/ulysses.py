"""The attention core that DeepSpeed's Ulysses wrapper calls, made aware of packed rows.

With sequence parallelism (distthink/engine/sequence_parallel.py) accelerate wraps the model's attention function
in DeepSpeed's `UlyssesSPAttentionHF` (ALST). For every layer that wrapper all-gathers `position_ids`, swaps the
sharding from sequence to heads with an all-to-all, calls the *core* attention function on the full row with a
slice of the heads, and swaps back. It discards any attention mask first (a mask built for one shard is wrong
for the full row, and a full-row mask is O(T^2)).

Its stock sdpa core, with no mask, is plain causal attention over the whole row: the samples of a packed row
would attend to each other (accelerate's documentation says as much: "sdpa doesn't handle multiple samples
combined into one correctly"). The cores below put the packing back from what the wrapper does hand them, the
gathered `position_ids`, which restart at 0 at every sample (and at a padding tail; the collator guarantees it):

- sdpa: the block-diagonal causal mask of distthink.data.packing.block_causal_mask, built from the sample
  starts, or no mask (sdpa's own causal path) when each row is one sample;
- flash-attn 2/3: explicit varlen `cu_seq_lens` from the same starts (distthink.data.packing.cu_seq_lens).

`install_packed_core(impl)` puts the core under the model's own attention key *before* accelerate registers the
wrapper, which then wraps it. The all-to-all and the head split stay DeepSpeed's.
"""

from __future__ import annotations

import torch
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from distthink.errors import ConfigError
from distthink.logging_utils import get_logger
from distthink.models.attention import block_causal_mask, cu_seq_lens

log = get_logger(__name__)

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
SUPPORTED = ("sdpa", *FLASH_IMPLEMENTATIONS)


def sample_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids restarting at 0 at each sample -> (B, T) segment index (0, 0, 1, 1, 1, 2, ...)."""
    return torch.cumsum((position_ids == 0).long(), dim=-1)


class _MaskCache:
    """The row's mask is the same for every layer of one forward: build it once per distinct position_ids."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def get(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        if self.key is not None and self.key.shape == position_ids.shape and torch.equal(self.key, position_ids):
            return self.mask
        segments = sample_segments(position_ids)
        one_sample_per_row = bool((position_ids[:, 0] == 0).all()) and int(segments.max()) == 1
        self.key = position_ids.detach().clone()
        self.mask = None if one_sample_per_row else block_causal_mask(segments)
        return self.mask


_sdpa_masks = _MaskCache()


def packed_sdpa_core(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
    """sdpa on the full (gathered) row, with the block-diagonal causal mask of its samples."""
    if position_ids is None:
        raise ConfigError("Ulysses sdpa core: no position_ids reached the attention. Fix: pass position_ids (the "
                          "packed batch's) to the model forward")
    return sdpa_attention_forward(module, query, key, value, _sdpa_masks.get(position_ids), *args, **kwargs)


def packed_flash_core(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
    """flash-attn varlen on the full (gathered) row, one sequence per sample."""
    if position_ids is None:
        raise ConfigError("Ulysses flash-attn core: no position_ids reached the attention. Fix: pass position_ids")
    cu, max_len = cu_seq_lens(position_ids)
    kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return flash_attention_forward(module, query, key, value, None, *args, position_ids=position_ids, **kwargs)


def install_packed_core(impl: str) -> None:
    """Register the packed-aware core under the attention key `impl`, for accelerate's Ulysses wrapper to wrap.

    Call it once per process, before `accelerator.prepare`; the wrapper then replaces the key's entry."""
    if impl not in SUPPORTED:
        raise ConfigError(f"sequence parallelism runs with attention {', '.join(SUPPORTED)}, not {impl!r}: Ulysses "
                          "hands the core attention the full row without a mask. Fix: set model.attn_implementation "
                          "to sdpa or flash_attention_2 (or auto)")
    ALL_ATTENTION_FUNCTIONS[impl] = packed_sdpa_core if impl == "sdpa" else packed_flash_core
    log.info("sequence parallel attention: DeepSpeed Ulysses all-to-all around %s; the packed rows' sample "
             "boundaries are rebuilt from the gathered position_ids", impl)
