"""The Discrete Ratio Selector (DRS): from a continuous prediction to a finite structural choice.

The paper's central observation is that a model learns a handful of discrete pooling operations well
but fails on a continuum of them. These functions turn the ratio head's ``y = log2(ratio)`` into a
member of a fixed candidate set (ratio-based, Eq. 1-3) or, for token backbones, a member of a fixed
set of latent counts (length-based, Eq. 4-5). They are pure functions on floats so that they can be
tested and reasoned about without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

QuantizeMode = Literal["round", "ceil", "floor"]
CompareSpace = Literal["linear", "log2"]

DEFAULT_RATIOS: tuple[int, ...] = (2, 4, 8, 16, 32)
DEFAULT_LENGTHS: tuple[int, ...] = (16, 32, 64, 128)


def scaled_y(y: float, scale: float = 0.0) -> float:
    """Eq. 1: the user's ``scale`` is an additive bias in log2 space (negative = keep more)."""
    return y + scale


def continuous_ratio(y: float, scale: float = 0.0) -> float:
    """Eq. 2: ``r = 2 ** (y + scale)``, the unquantized ratio the fully dynamic baseline uses."""
    return 2.0 ** scaled_y(y, scale)


def quantize(
    value: float,
    candidates: Sequence[float],
    mode: QuantizeMode = "round",
    space: CompareSpace = "linear",
) -> float:
    """Map ``value`` onto ``candidates``.

    ``round`` takes the nearest candidate (Eq. 3 / Eq. 5), measured as ``|value - c|`` in ``linear``
    space (as the paper writes it) or as ``|log2 value - log2 c|`` in ``log2`` space (geometric
    midpoints, symmetric for doubling sets). ``ceil``/``floor`` take the smallest candidate at or
    above / largest at or below ``value``, clamped to the set's ends. Ties go to the smaller candidate.
    """
    if not candidates:
        raise ValueError("the candidate set is empty")
    if not math.isfinite(value):
        raise ValueError(f"cannot quantize a non-finite value {value!r}")
    ordered = sorted(candidates)
    if mode == "ceil":
        return next((c for c in ordered if c >= value), ordered[-1])
    if mode == "floor":
        return next((c for c in reversed(ordered) if c <= value), ordered[0])
    if mode != "round":
        raise ValueError(f"unknown quantize mode {mode!r}; expected round, ceil or floor")
    if space == "log2":
        if value <= 0 or ordered[0] <= 0:
            raise ValueError("log2 comparison needs positive values and candidates")
        target = math.log2(value)
        return min(ordered, key=lambda c: abs(math.log2(c) - target))
    if space != "linear":
        raise ValueError(f"unknown comparison space {space!r}; expected linear or log2")
    return min(ordered, key=lambda c: abs(c - value))


def select_ratio(
    y: float,
    scale: float = 0.0,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    mode: QuantizeMode = "round",
    space: CompareSpace = "linear",
) -> float:
    """Ratio-based DRS (Eq. 1-3): the pooling window for a context predicted at ``y``."""
    return quantize(continuous_ratio(y, scale), ratios, mode, space)


def select_length(
    y: float,
    num_tokens: int,
    scale: float = 0.0,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    mode: QuantizeMode = "round",
    space: CompareSpace = "linear",
) -> int:
    """Length-based DRS (Eq. 4-5) for token backbones: quantize ``m = L / r`` to ``lengths``.

    The paper writes ``m = r * L`` with ``r`` a fraction; here ratios are ``>= 1`` throughout, so the
    continuous latent count is ``L / r``.
    """
    if num_tokens <= 0:
        raise ValueError("num_tokens must be positive")
    return int(quantize(num_tokens / continuous_ratio(y, scale), lengths, mode, space))


def check_ratio(ratio: float, candidates: Sequence[float]) -> float:
    """Validate a user-requested ratio: the model only learned the ratios in its candidate set."""
    if ratio not in candidates:
        raise ValueError(
            f"ratio {ratio!r} is not in the candidate set {sorted(candidates)}; the model was only "
            "trained on these ratios"
        )
    return ratio
