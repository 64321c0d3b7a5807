"""The attention inputs of a packed batch: what to give a HF decoder so that attention never crosses a sample
boundary, whatever the attention implementation (the batch contract is distthink/data/packing.py's).

flash-attn varlen gets explicit ``cu_seq_lens_*``/``max_length_*``; SDPA/eager get an explicit block-diagonal
causal 4-D mask built from ``segment_ids``. We do *not* rely on transformers detecting packing from
``position_ids`` alone: that detection is skipped whenever a KV cache exists, and HF models create one by default
(``config.use_cache=True``) unless gradient checkpointing is on. ``tests/models/test_packed_forward.py``
demonstrates that trap.
"""

from __future__ import annotations

from typing import Any

import torch

from distthink.errors import ConfigError
from distthink.logging_utils import get_logger

log = get_logger(__name__)


_FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
_logged_paths: set[str] = set()


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool mask, True where query t may attend key s.

    t attends s iff s <= t and both lie in the same segment. Padding (-1) is one more segment, so every
    query row has at least itself to attend to (no all-masked row, hence no NaN in softmax).
    """
    T = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril_()
    return (same & causal)[:, None, :, :]


def cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths of the flattened (B*T,) row, for flash-attn varlen.

    A new sequence starts wherever ``position_ids`` is 0 (each sample, each padding tail, each row),
    which the collator guarantees. Returns (int32 tensor of shape (num_seqs + 1,), max sequence length).
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).view(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int(cu.diff().max())


def attn_implementation_of(model: torch.nn.Module) -> str:
    """The attention implementation a (possibly PEFT/DeepSpeed-wrapped) HF model runs with."""
    for obj in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        cfg = getattr(obj, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl:
            return impl
    raise ConfigError("cannot find config._attn_implementation on the model; pass attn_implementation explicitly")


def model_inputs(batch: dict[str, Any], attn_implementation: str, *, dtype: torch.dtype = torch.float32,
                 with_input_ids: bool = True) -> dict[str, Any]:
    """Keyword arguments for a HF decoder forward so attention stays inside each sample.

    - flash_attention_2/3/4: ``position_ids`` plus explicit ``cu_seq_lens_q/k`` and ``max_length_q/k``
      (varlen kernel, no mask tensor, O(T) memory).
    - sdpa: an explicit (B, 1, T, T) bool block-diagonal causal mask.
    - eager: the same mask as an additive float mask in ``dtype`` (0 / finfo.min), which eager expects.
    - anything else (e.g. flex_attention): ``position_ids`` with ``attention_mask=None``, relying on
      transformers' own packed-sequence detection (valid because we also pass ``use_cache=False``).

    Always sets ``use_cache=False``: training never needs a KV cache, and a cache disables HF's
    packed-sequence handling. ``with_input_ids=False`` leaves ``input_ids`` out (callers that pass
    ``inputs_embeds``, e.g. placeholder injection). Returns a dict of tensors on the batch's device.
    """
    position_ids, segment_ids = batch["position_ids"], batch["segment_ids"]
    kw: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
    if with_input_ids:
        kw["input_ids"] = batch["input_ids"]
    if attn_implementation in _FLASH_IMPLEMENTATIONS:
        cu, max_len = cu_seq_lens(position_ids)
        kw.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
                  max_length_k=max_len)
        path = f"{attn_implementation} varlen (cu_seq_lens from position_ids)"
    elif attn_implementation == "sdpa":
        kw["attention_mask"] = block_causal_mask(segment_ids)
        path = "sdpa with an explicit block-diagonal causal mask"
    elif attn_implementation == "eager":
        allowed = block_causal_mask(segment_ids)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        kw["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        path = "eager with an explicit additive block-diagonal causal mask"
    else:
        kw["attention_mask"] = None
        path = f"{attn_implementation} with transformers' packed-sequence detection from position_ids"
    if path not in _logged_paths:
        _logged_paths.add(path)
        log.info("packed attention path: %s", path)
    return kw
