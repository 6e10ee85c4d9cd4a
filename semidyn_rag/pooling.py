"""Backbones: how a window of encoder hidden states becomes a shorter sequence of features.

All functions take the hidden states of ONE context (``[L, d]``, no padding; the ``<eos>`` row
included only when the compressor pools it, ``CompressorConfig.pool_eos``) plus the structural
parameter chosen by the selector, and return ``[M, d]``. Per-context calls keep padding
logic out of the arithmetic; the encoder pass itself is batched.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Alignment = Literal["start", "end"]


def num_windows(length: int, window: int) -> int:
    """Latent count of mean pooling: ``ceil(L / S)`` (at least one for a non-empty context)."""
    if length <= 0 or window <= 0:
        raise ValueError(f"length and window must be positive, got {length} and {window}")
    return math.ceil(length / window)


def mean_pool(hidden: torch.Tensor, window: int, align: Alignment = "start") -> torch.Tensor:
    """Mean over non-overlapping windows of ``window`` tokens.

    ``start``: windows begin at the first token and the last, partial window is averaged over its
    real token count (our default, and the paper's inference when its head picks the ratio).
    ``end``: windows end at the last token and the sequence is zero-padded at the front, the padded
    zeros counting in the first window's mean (the paper's code for a fixed ratio, in training and
    inference alike).
    """
    length, dim = hidden.shape
    count = num_windows(length, window)
    pad = count * window - length
    if align == "start":
        padded = F.pad(hidden, (0, 0, 0, pad))
        sums = padded.view(count, window, dim).sum(dim=1)
        sizes = torch.full((count, 1), float(window), dtype=hidden.dtype, device=hidden.device)
        sizes[-1] = window - pad
        return sums / sizes
    if align == "end":
        padded = F.pad(hidden, (0, 0, pad, 0))
        return padded.view(count, window, dim).mean(dim=1)
    raise ValueError(f"unknown alignment {align!r}; expected start or end")


def last_tokens(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """The hidden states of the final ``count`` tokens (all of them when the context is shorter)."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    return hidden[-count:]


def window_for_length(length: int, target: int) -> int:
    """Mean-pooling window that yields about ``target`` latents (the fixed-length setting)."""
    return max(1, math.ceil(length / max(target, 1)))
