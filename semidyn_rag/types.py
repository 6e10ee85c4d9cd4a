"""Plain data types shared by the compressor, the store and the integrations.

They hold tensors and numbers only, no model objects, so that a store or a framework adapter can
carry them around without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the store reads and checks entries without torch
    import torch


@dataclass(frozen=True)
class CompressedContext:
    """One text after compression: the decoder-space latents and how they were chosen.

    A text longer than the encoder's limit is split into segments that are compressed in turn; each
    segment has its own predicted ``y`` and chosen ratio, and their latents are concatenated.
    """

    latents: torch.Tensor
    """``[num_latents, decoder_hidden]`` — what replaces the text's placeholder in the decoder prompt."""
    num_tokens: int
    """Token count of the original text (without the appended ``<eos>``)."""
    segment_ratios: tuple[float, ...]
    """Ratio chosen for each segment (window size for mean pooling; ``tokens / latents`` otherwise)."""
    segment_y: tuple[float, ...]
    """Raw prediction of the ratio head per segment (``log2`` ratio, before ``scale``); NaN if unused."""

    @property
    def num_latents(self) -> int:
        return int(self.latents.shape[0])

    @property
    def ratio(self) -> float:
        """The chosen ratio: the selector's choice for a one-segment text, else the effective ratio."""
        if len(self.segment_ratios) == 1:
            return self.segment_ratios[0]
        return self.compression

    @property
    def compression(self) -> float:
        """Effective compression ``num_tokens / num_latents`` (the paper's metric counts this)."""
        return self.num_tokens / max(self.num_latents, 1)

    @property
    def predicted_y(self) -> float:
        """The head's prediction for the first segment (the whole text when it fits the encoder)."""
        return self.segment_y[0]
