"""The one record that flows from encoding to packing to the loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The label / target of a token that is not learned (the value PyTorch's cross-entropy skips by default).
IGNORE_INDEX = -100

#: What becomes of a malformed record: "skip" (counted by reason, the first reasons reported) or "raise" (stop
#: at the first one). One default for training (`data.on_error`) and `distthink inspect`.
ON_ERROR_CHOICES = ("skip", "raise")
ON_ERROR_DEFAULT = "skip"


@dataclass
class EncodedSample:
    """One tokenised training sample.

    All three lists have the same length T and are aligned with each other (HF convention: labels[t]
    is the token at position t, *not* yet shifted; the collator shifts within each sample so that no
    target ever crosses into the next packed sample).

    - input_ids:    token ids, exactly the tokenisation of the canonical chat-template render.
    - labels:       input_ids where the token is learned, -100 elsewhere.
    - loss_weights: float per token; 0.0 wherever labels == -100.
    - meta:         free-form side information (sample type, user/item ids, graph index, ...).
    """

    input_ids: list[int]
    labels: list[int]
    loss_weights: list[float]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.input_ids) == len(self.labels) == len(self.loss_weights)):
            raise ValueError(
                f"EncodedSample lists differ in length: input_ids={len(self.input_ids)}, "
                f"labels={len(self.labels)}, loss_weights={len(self.loss_weights)}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_learned(self) -> int:
        return sum(1 for lab in self.labels if lab != IGNORE_INDEX)

    @property
    def weight_sum(self) -> float:
        return float(sum(self.loss_weights))
