"""Placeholder -> projected-embedding injection, shared by the ThinkRec CF encoders and the graph encoder.

A prompt carries dedicated special tokens (``<UserID>``, ``<ItemID>``, ``<|graph|>`` ...). Before the decoder
runs, the token-embedding rows at those positions are replaced by vectors coming from an encoder + projector.

The contract is strict on purpose: the i-th vector of a placeholder kind goes to the i-th placeholder token of
that kind, counting *sample by sample* (sample-major) and within a sample in order of appearance. If a sample
has a different number of placeholder tokens than vectors were provided for it, that is a DistthinkError that
names the sample: a silent shift would feed user A's embedding into user B's prompt.

Everything is vectorised (one ``index_put`` for all kinds, bincounts for the checks): no per-sample Python loop.
The checks cost a few host syncs per call (``nonzero``, one ``max`` for packed rows); that is the price of
never injecting a vector into the wrong prompt, and it is small next to a decoder forward.

Pieces:
- :func:`add_placeholder_tokens`  registers the placeholders as added special tokens and grows the embedding
  matrix only when needed (Qwen3's matrix is already larger than its tokenizer; it must never shrink).
- :class:`Projector`  the MLP d -> m*d -> hidden*k (k = ``proj_token_num`` tokens per id), ReLU or GELU.
- :class:`PlaceholderSlot` + :func:`inject_placeholders`  the replacement itself.
- :func:`embed_with_injection`  convenience: model's embedding layer + injection -> ``inputs_embeds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from distthink.errors import DistthinkError

__all__ = [
    "add_placeholder_tokens",
    "Projector",
    "PROJECTOR_ACTIVATIONS",
    "PlaceholderSlot",
    "inject_placeholders",
    "embed_with_injection",
]


def add_placeholder_tokens(tokenizer, tokens: Sequence[str], model: nn.Module | None = None,
                           *, pad_to_multiple_of: int | None = None) -> dict[str, int]:
    """Register ``tokens`` as added special tokens and make the model's embedding matrix large enough.

    Uses ``tokenizer.add_special_tokens({"additional_special_tokens": tokens})`` *without* replacing the
    tokenizer's existing extra special tokens, so the call is idempotent and composable (CF placeholders and
    ``<|graph|>`` can be added by different recipes). The model's token embeddings are resized only when the
    tokenizer outgrew them: Qwen3 ships a 151936-row matrix for a 151669-token tokenizer, and resizing to
    ``len(tokenizer)`` would silently *shrink* it and cut off real rows.

    Returns ``{token: id}``. Raises DistthinkError if a token would be split into several pieces.
    """
    tokens = list(tokens)
    if not tokens:
        raise DistthinkError("add_placeholder_tokens: no tokens given. Fix: pass e.g. ['<|graph|>'].")
    for tok in tokens:
        if not isinstance(tok, str) or not tok or tok != tok.strip():
            raise DistthinkError(f"placeholder token {tok!r} must be a non-empty string without surrounding "
                                 "whitespace. Fix: use a name like '<UserID>'.")
    try:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    except TypeError:  # transformers < 5 names the keyword differently
        tokenizer.add_special_tokens({"additional_special_tokens": tokens},
                                     replace_additional_special_tokens=False)
    ids = {}
    for tok in tokens:
        enc = tokenizer.encode(tok, add_special_tokens=False)
        if len(enc) != 1:
            raise DistthinkError(f"placeholder {tok!r} tokenises into {len(enc)} pieces {enc} after being added. "
                                 "Fix: report this; added special tokens must map to one id.")
        ids[tok] = int(enc[0])
    if model is not None:
        current = model.get_input_embeddings().weight.shape[0]
        needed = max(ids.values()) + 1
        if needed > current:
            model.resize_token_embeddings(max(needed, len(tokenizer)), pad_to_multiple_of=pad_to_multiple_of)
    return ids


#: Projector activations by name (the name is what task options and export metadata record).
PROJECTOR_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Projector(nn.Module):
    """MLP mapping encoder vectors into the LLM embedding space, ``k`` tokens per input vector.

    ``d_in -> mult*d_in -> hidden_size*k`` with ``activation`` (``relu`` or ``gelu``) in between.

    Shapes: ``forward(x)``: (N, d_in) -> (N, k, hidden_size).
    The constructor defaults (``mult=10``, GELU) are the molecule task's; ThinkRec builds its projector from its
    own options (``mid_mult`` 5 and ReLU, as the ThinkRec code: distthink/tasks/thinkrec/options.py).
    """

    def __init__(self, d_in: int, hidden_size: int, *, mult: int = 10, k: int = 1, activation: str = "gelu"):
        super().__init__()
        if d_in <= 0 or hidden_size <= 0 or mult <= 0 or k <= 0:
            raise DistthinkError(f"Projector sizes must be positive, got d_in={d_in}, hidden_size={hidden_size}, "
                                 f"mult={mult}, k={k}. Fix: check the encoder dim and proj_token_num in the config.")
        if activation not in PROJECTOR_ACTIVATIONS:
            raise DistthinkError(f"Projector activation {activation!r} is unknown. Fix: use one of "
                                 f"{sorted(PROJECTOR_ACTIVATIONS)}.")
        self.d_in, self.hidden_size, self.k, self.activation = d_in, hidden_size, k, activation
        self.net = nn.Sequential(nn.Linear(d_in, mult * d_in), PROJECTOR_ACTIVATIONS[activation](),
                                 nn.Linear(mult * d_in, hidden_size * k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[-1] != self.d_in:
            raise DistthinkError(f"Projector expects (N, {self.d_in}) inputs, got {tuple(x.shape)}. "
                                 "Fix: the encoder output dim must equal the projector's d_in.")
        return self.net(x).view(x.shape[0], self.k, self.hidden_size)


@dataclass
class PlaceholderSlot:
    """One placeholder kind and the vectors that replace its tokens.

    - ``token_id``: the placeholder's token id.
    - ``vectors``: (N, H) or (N, k, H). With (N, k, H) each of the N ids fills k *consecutive-in-order*
      placeholder tokens (the prompt must hold k placeholder tokens per id).
    - ``counts``: optional (S,) long, the number of ids (rows of ``vectors`` dim 0) belonging to each sample,
      in sample order. With it, a mismatch names the exact sample; without it only the totals are checked
      (and the error lists the per-sample placeholder counts found, so you can still locate it).
    - ``name``: for error messages (e.g. ``'<UserID>'``).
    """

    token_id: int
    vectors: torch.Tensor
    counts: torch.Tensor | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"token id {self.token_id}"

    def flat_vectors(self) -> torch.Tensor:
        v = self.vectors
        if v.dim() == 3:
            return v.reshape(-1, v.shape[-1])
        if v.dim() == 2:
            return v
        raise DistthinkError(f"vectors for {self.label} must be (N, H) or (N, k, H), got {tuple(v.shape)}.")

    @property
    def tokens_per_id(self) -> int:
        return self.vectors.shape[1] if self.vectors.dim() == 3 else 1


def _describe_sample(sample: int, segment_mode: bool, sample_row: torch.Tensor | None) -> str:
    if segment_mode:
        row = int(sample_row[sample]) if sample_row is not None and sample < sample_row.numel() else "?"
        return f"sample {sample} (packed segment {sample}, row {row})"
    return f"sample {sample} (row {sample})"


def inject_placeholders(input_ids: torch.Tensor, inputs_embeds: torch.Tensor, slots: Sequence[PlaceholderSlot],
                        *, segment_ids: torch.Tensor | None = None, num_samples: int | None = None,
                        inplace: bool = False) -> torch.Tensor:
    """Return ``inputs_embeds`` with placeholder rows replaced by the slots' vectors (a copy unless ``inplace``).

    Shapes: ``input_ids`` (B, T) long; ``inputs_embeds`` (B, T, H); ``segment_ids`` (B, T) long with -1 on
    padding (packed rows, see the batch contract) or None, in which case each row is one sample.

    Ordering: the vectors of a slot are consumed sample by sample (sample index = segment id, or row index),
    and within a sample in order of appearance. Gradients flow into both the slot vectors (hence the projector)
    and ``inputs_embeds`` at non-placeholder positions. The result has ``inputs_embeds``' dtype.

    ``inplace=True`` writes into ``inputs_embeds`` instead of copying it (one full (B, T, H) copy saved). Only
    use it on a fresh tensor nobody else reads, such as the output of the embedding layer (autograd allows it:
    the embedding backward does not need its output); :func:`embed_with_injection` does exactly that.

    Raises DistthinkError when a placeholder sits on padding, or when the number of placeholder tokens of a kind
    in a sample differs from the number of vectors given for it (naming the first such sample).
    """
    if input_ids.dim() != 2 or inputs_embeds.dim() != 3 or inputs_embeds.shape[:2] != input_ids.shape:
        raise DistthinkError(f"inject_placeholders: input_ids {tuple(input_ids.shape)} and inputs_embeds "
                             f"{tuple(inputs_embeds.shape)} must be (B, T) and (B, T, H).")
    if not slots:
        return inputs_embeds
    B, T, H = inputs_embeds.shape
    device = inputs_embeds.device
    flat_ids = input_ids.reshape(-1)
    segment_mode = segment_ids is not None
    if segment_mode:
        if segment_ids.shape != input_ids.shape:
            raise DistthinkError(f"segment_ids {tuple(segment_ids.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}.")
        flat_sample = segment_ids.reshape(-1).to(device)
        n_samples = int(flat_sample.max().item()) + 1 if flat_sample.numel() else 0
    else:
        flat_sample = torch.arange(B, device=device).repeat_interleave(T)
        n_samples = B
    if num_samples is not None:
        n_samples = max(n_samples, int(num_samples))

    seen = set()
    all_pos, all_vec = [], []
    for slot in slots:
        if slot.token_id in seen:
            raise DistthinkError(f"placeholder {slot.label} appears in two slots. Fix: concatenate its vectors "
                                 "into one PlaceholderSlot.")
        seen.add(slot.token_id)
        vec = slot.flat_vectors()
        if vec.shape[-1] != H:
            raise DistthinkError(f"vectors for {slot.label} have width {vec.shape[-1]} but the model's hidden size "
                                 f"is {H}. Fix: set the projector's hidden_size to the LLM hidden size.")
        pos = torch.nonzero(flat_ids == slot.token_id, as_tuple=False).squeeze(1).to(device)
        samp = flat_sample[pos]
        if (samp < 0).any():
            bad = int(pos[samp < 0][0])
            raise DistthinkError(f"placeholder {slot.label} found on a padding position (row {bad // T}, "
                                 f"position {bad % T}). Fix: the collator must not pad with placeholder ids.")
        _check_counts(slot, vec, samp, n_samples, segment_mode, segment_ids, B, T)
        # Sample-major, then order of appearance: a stable sort by sample id keeps appearance order within each.
        order = torch.sort(samp, stable=True).indices
        all_pos.append(pos[order])
        all_vec.append(vec.to(device=device, dtype=inputs_embeds.dtype))

    positions = torch.cat(all_pos)
    vectors = torch.cat(all_vec)
    flat = inputs_embeds.reshape(B * T, H)
    # index_put: autograd sends gradients to `vectors` at the placeholder rows and to `inputs_embeds` everywhere
    # else (its rows at placeholder positions get zero gradient, which is what we want).
    if inplace and inputs_embeds.is_contiguous():  # reshape is then a view, so the write lands in inputs_embeds
        flat.index_put_((positions,), vectors)
        return inputs_embeds
    return flat.index_put((positions,), vectors).view(B, T, H)


def _segment_rows(segment_ids: torch.Tensor, n_samples: int, B: int, T: int) -> torch.Tensor:
    """Row of each segment (for error messages only)."""
    flat_seg = segment_ids.reshape(-1)
    rows = torch.arange(B, device=flat_seg.device).repeat_interleave(T)
    sample_row = torch.full((max(n_samples, 1),), -1, dtype=torch.long, device=flat_seg.device)
    valid = flat_seg >= 0
    sample_row.scatter_(0, flat_seg[valid], rows[valid])
    return sample_row


def _check_counts(slot: PlaceholderSlot, vec: torch.Tensor, samp: torch.Tensor, n_samples: int,
                  segment_mode: bool, segment_ids: torch.Tensor | None, B: int, T: int) -> None:
    k = slot.tokens_per_id
    found = torch.bincount(samp, minlength=n_samples) if samp.numel() else torch.zeros(n_samples, dtype=torch.long,
                                                                                          device=samp.device)
    if slot.counts is not None:
        counts = torch.as_tensor(slot.counts, dtype=torch.long, device=samp.device).reshape(-1)
        if int(counts.sum()) * k != vec.shape[0]:
            raise DistthinkError(f"{slot.label}: counts sum to {int(counts.sum())} ids (x{k} tokens each) but "
                                 f"{vec.shape[0] // max(k, 1)} ids' vectors were given. Fix: counts must describe "
                                 "the rows of `vectors`.")
        if counts.numel() > n_samples:
            extra = torch.nonzero(counts[n_samples:] > 0)
            if extra.numel():
                s = n_samples + int(extra[0])
                raise DistthinkError(f"{slot.label}: vectors were given for sample {s} but the batch has only "
                                     f"{n_samples} samples. Fix: align the side inputs with the packed samples.")
            counts = counts[:n_samples]
        expected = torch.zeros(n_samples, dtype=torch.long, device=samp.device)
        expected[: counts.numel()] = counts * k
        diff = torch.nonzero(expected != found)
        if diff.numel():
            s = int(diff[0])
            sample_row = _segment_rows(segment_ids, n_samples, B, T) if segment_mode else None
            raise DistthinkError(
                f"{_describe_sample(s, segment_mode, sample_row)} has {int(found[s])} {slot.label} placeholder "
                f"token(s) but {int(expected[s]) // k} id vector(s) x {k} token(s) per id = {int(expected[s])} were "
                "provided. Fix: the prompt must hold exactly k placeholder tokens per provided id (check truncation "
                "and the history length).")
    elif int(found.sum()) != vec.shape[0]:
        per_sample = {i: int(c) for i, c in enumerate(found.tolist()) if c}
        raise DistthinkError(
            f"the batch has {int(found.sum())} {slot.label} placeholder token(s) but {vec.shape[0]} vector row(s) "
            f"were provided (placeholder tokens per sample: {per_sample}). Fix: pass `counts` per sample to locate "
            "the sample, and check prompt truncation.")


def embed_with_injection(model: nn.Module, input_ids: torch.Tensor, slots: Sequence[PlaceholderSlot], *,
                         segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``inputs_embeds`` (B, T, H) for ``model``: its token embeddings with the slots' vectors injected.

    Checks that every placeholder id has a row in the embedding matrix (i.e. :func:`add_placeholder_tokens`
    was called with the model) before looking anything up, so the failure is a DistthinkError rather than an
    index error deep inside torch.
    """
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    for slot in slots:
        if not 0 <= slot.token_id < vocab:
            raise DistthinkError(f"placeholder {slot.label} (id {slot.token_id}) is outside the embedding matrix "
                                 f"({vocab} rows). Fix: call add_placeholder_tokens(tokenizer, tokens, model=model).")
    embeds = emb(input_ids)
    # The embedding output is a fresh tensor only we hold: inject in place and save a (B, T, H) copy. Except when
    # it is a grad-requiring leaf: HF's enable_input_require_grads() (gradient checkpointing with a frozen
    # embedding, the usual LoRA set-up) makes it one, and autograd forbids in-place writes to such leaves.
    inplace = not (embeds.is_leaf and embeds.requires_grad)
    return inject_placeholders(input_ids, embeds, slots, segment_ids=segment_ids, inplace=inplace)
