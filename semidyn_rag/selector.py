"""The Discrete Ratio Selector (DRS): from a continuous prediction to a finite structural choice.

The paper's central observation is that a model learns a handful of discrete pooling operations well
but fails on a continuum of them. These functions turn the ratio head's ``y = log2(ratio)`` into a
member of a fixed candidate set (ratio-based, Eq. 1-3) or, for token backbones, a member of a fixed
set of latent counts (length-based, Eq. 4-5). They are pure functions on floats so that they can be
tested and reasoned about without a model. ``official_select_ratio`` / ``official_select_length``
discretise as the paper's released code does (``CompressorConfig.selector_semantics="official"``):
in the ratio head's dtype, with that code's tie and clamping rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

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


# ---------------------------------------------------------------------- the paper's semantics
def official_select_ratio(
    y: float,
    scale: float,
    ratios: list[float],
    mode: QuantizeMode,
    space: CompareSpace,
    dtype: torch.dtype,
) -> float:
    """The ratio the paper's code picks for a head output ``y`` (``log2`` ratio) and ``scale``.

    Computed as that code does, in ``dtype`` (the head's; bf16 in its evaluation): ``y + scale``,
    then ``2 ** (y + scale)`` against the ratios (``linear``) or ``y + scale`` against their
    ``log2`` (``log2``). ``round``: nearest, ties to the first of ``ratios`` in order.
    ``ceil``/``floor``: the nearest candidate strictly above/below; when there is none, the
    smallest (``ceil``) or largest (``floor``) ratio. Raises ``ValueError`` for a non-finite ``y``
    (a checkpoint without a ratio head).
    """
    if not math.isfinite(y):
        raise ValueError(
            f"the ratio head gave {y!r}: this checkpoint has no trained ratio head; "
            "pass ratio= or use a fixed mode"
        )
    pred = torch.tensor([y], dtype=dtype) + scale
    if space == "log2":
        target = pred
        cand = torch.tensor([math.log2(r) for r in ratios], dtype=dtype)
    else:
        target = torch.pow(2.0, pred)
        cand = torch.tensor(list(ratios), dtype=dtype)
    diff = target - cand
    inf = torch.full_like(diff, float("inf"))
    if mode == "round":
        index = diff.abs().argmin()
    elif mode in ("ceil", "floor"):
        side = diff < 0 if mode == "ceil" else diff > 0
        pick = torch.where(side, diff.abs(), inf)
        if bool(torch.isinf(pick).all()):
            index = diff.argmax() if mode == "ceil" else diff.argmin()
        else:
            index = pick.argmin()
    else:
        raise ValueError(f"unknown quantize mode {mode!r}; expected round, ceil or floor")
    return float(ratios[int(index)])


def official_select_length(
    y: float, length: int, scale: float, lengths: list[int], dtype: torch.dtype
) -> int:
    """The latent count the paper's code picks for token backbones: ``int(L * 2 ** -(y + scale))``
    (the fraction clamped to ``(0, 1]``, computed in ``dtype``), then the nearest of ``lengths``
    (ties to the first in order), at most ``L``. ``length`` counts the ``<eos>``."""
    if not math.isfinite(y):
        raise ValueError(f"the ratio head gave {y!r}: this checkpoint has no trained ratio head")
    pred = torch.tensor([y], dtype=dtype) + scale
    fraction = torch.pow(2.0, -pred).clamp(min=1e-9, max=1.0)
    raw = (torch.tensor([float(length)]) * fraction).long()
    index = (raw - torch.tensor(list(lengths))).abs().argmin()
    return max(1, min(int(lengths[int(index)]), length))
