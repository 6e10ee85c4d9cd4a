"""Backbones: how one context's encoder states become its ``M`` features, chosen by name.

Every backbone has one contract (`Backbone`): from the ratio or latent count the mode chose, its
structural parameter (a pooling window, or a latent count within what it can give); from one
row of encoder states and that parameter, the ``[M, d]`` features the converter maps. They are
registered in `BACKBONES` under the names ``CompressorConfig.backbone`` takes.

`structure` is the policy in front of them: the compressor's mode (fixed ratio or length,
multi-ratio, semi- or fully dynamic), the ratio head's ``y`` and the user's ``scale`` or explicit
``ratio`` decide a ratio or a latent count through the selector; the backbone turns it into its
parameter. No model objects here: tensors, numbers and the config.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from . import pooling, selector
from .config import CompressorConfig


def pooled_length(config: CompressorConfig, num_tokens: int) -> int:
    """Positions a backbone reads: the context, plus its ``<eos>`` with ``config.pool_eos``."""
    return num_tokens + 1 if config.pool_eos else num_tokens


class Backbone:
    """One way of turning a row of encoder states ``[T, d]`` into ``[M, d]`` features.

    The row is ``context + <eos>`` (+ :meth:`appended` positions), unpadded at the front; the
    context has ``num_tokens`` tokens.
    """

    name: ClassVar[str]
    chooses_ratios: ClassVar[bool] = False
    """Semi-dynamic mode picks one of ``config.ratios`` (ratio-based DRS) rather than one of
    ``config.lengths`` (length-based DRS)."""

    def appended(self, config: CompressorConfig) -> int:
        """Learned positions the encoder appends after ``<eos>`` for this backbone (0: none)."""
        return 0

    def parameter(self, config: CompressorConfig, window: int, count: int, length: int) -> int:
        """The structural parameter from the mode's pooling ``window`` and latent ``count``
        (either may be 0 when the mode chose the other) for ``length`` pooled positions."""
        raise NotImplementedError

    def extract(
        self,
        config: CompressorConfig,
        hidden: torch.Tensor,
        num_tokens: int,
        parameter: int,
        fixed: bool,
    ) -> torch.Tensor:
        """The ``[M, d]`` features of one row; ``fixed``: the ratio was not the head's choice."""
        raise NotImplementedError

    def ratio(self, parameter: int, num_tokens: int) -> float:
        """The compression ratio a parameter stands for (reported in `CompressedContext`)."""
        return num_tokens / parameter

    def fewest_latents(self, num_tokens: int, ratio: float) -> int:
        """A lower bound on the features of ``num_tokens`` tokens at ``ratio`` or below."""
        return 1


class MeanPooling(Backbone):
    """Means over non-overlapping windows of ``parameter`` positions (`pooling.mean_pool`)."""

    name = "mean_pooling"
    chooses_ratios = True

    def parameter(self, config: CompressorConfig, window: int, count: int, length: int) -> int:
        return window

    def extract(
        self,
        config: CompressorConfig,
        hidden: torch.Tensor,
        num_tokens: int,
        parameter: int,
        fixed: bool,
    ) -> torch.Tensor:
        align = config.pooling_alignment
        if fixed and config.fixed_ratio_alignment is not None:
            align = config.fixed_ratio_alignment
        return pooling.mean_pool(hidden[: pooled_length(config, num_tokens)], parameter, align)

    def ratio(self, parameter: int, num_tokens: int) -> float:
        return float(parameter)

    def fewest_latents(self, num_tokens: int, ratio: float) -> int:
        return math.ceil(num_tokens / ratio)


class LastTokens(Backbone):
    """The states of the last ``parameter`` pooled positions (`pooling.last_tokens`)."""

    name = "last_tokens"

    def parameter(self, config: CompressorConfig, window: int, count: int, length: int) -> int:
        return max(1, min(count, length))

    def extract(
        self,
        config: CompressorConfig,
        hidden: torch.Tensor,
        num_tokens: int,
        parameter: int,
        fixed: bool,
    ) -> torch.Tensor:
        return pooling.last_tokens(hidden[: pooled_length(config, num_tokens)], parameter)


class CompressionTokens(Backbone):
    """The states of the first ``parameter`` of ``config.memory_tokens`` learned positions that
    the encoder appends after ``<eos>`` (causal attention: they read the context, not back)."""

    name = "compression_tokens"

    def appended(self, config: CompressorConfig) -> int:
        return config.memory_tokens

    def parameter(self, config: CompressorConfig, window: int, count: int, length: int) -> int:
        limit = config.memory_tokens
        if config.selector_semantics == "official":
            limit = min(limit, length)
        return max(1, min(count, limit))

    def extract(
        self,
        config: CompressorConfig,
        hidden: torch.Tensor,
        num_tokens: int,
        parameter: int,
        fixed: bool,
    ) -> torch.Tensor:
        start = num_tokens + 1
        return hidden[start : start + parameter]


BACKBONES: dict[str, Backbone] = {
    b.name: b for b in (MeanPooling(), LastTokens(), CompressionTokens())
}
"""Every backbone by its ``CompressorConfig.backbone`` name."""


def get(name: str) -> Backbone:
    """The backbone called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}"
        ) from None


_FIXED_MODES = ("fixed_ratio", "multi_ratio")
"""Modes whose ratio is ``config.fixed_ratio`` unless a call passes one."""


def fixed_by_mode(config: CompressorConfig, ratio: float | None) -> bool:
    """Whether the ratio is given rather than chosen by the head (explicit, or a fixed mode)."""
    return ratio is not None or config.mode in _FIXED_MODES


def _given_ratio(config: CompressorConfig, ratio: float | None) -> float | None:
    """The explicit ``ratio``, else a fixed mode's ``config.fixed_ratio``; ``None``: the mode
    chooses (from the head's prediction, or a fixed length)."""
    if ratio is None and config.mode in _FIXED_MODES:
        return config.fixed_ratio
    return ratio


def structure(
    config: CompressorConfig,
    y: float,
    num_tokens: int,
    scale: float = 0.0,
    ratio: float | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> int:
    """The structural parameter for one segment of ``num_tokens`` tokens (see `Backbone`).

    ``y`` is the ratio head's prediction (``log2`` ratio), ``scale`` the user's bias on it. An
    explicit ``ratio`` overrides the mode and must be one of ``config.ratios`` (``ValueError``
    otherwise). ``dtype`` is the head's: the paper's selector semantics compute in it. Raises
    ``ValueError`` when the mode needs ``y`` and it is not finite (a checkpoint without a trained
    ratio head).
    """
    if ratio is not None:
        selector.check_ratio(ratio, config.ratios)
    backbone = get(config.backbone)
    length = pooled_length(config, num_tokens)
    official = config.selector_semantics == "official"
    ratio = _given_ratio(config, ratio)
    if ratio is None and config.mode == "semi_dynamic" and backbone.chooses_ratios:
        if official:
            ratio = selector.official_select_ratio(
                y, scale, config.ratios, config.quantize, config.compare_space, dtype
            )
        else:
            ratio = selector.select_ratio(
                y, scale, config.ratios, config.quantize, config.compare_space
            )
    if ratio is None and config.mode == "fully_dynamic":
        if not math.isfinite(y):  # max(1.0, nan) would be 1.0: every token kept, silently
            raise ValueError(
                f"the ratio head gave {y!r}: this checkpoint has no trained ratio head; "
                "pass ratio= or use a fixed mode"
            )
        ratio = max(1.0, selector.continuous_ratio(y, scale))
    if ratio is not None:
        window = max(1, round(ratio))
        count = math.ceil(length / window)
    elif config.mode == "fixed_length":
        count = config.fixed_length
        window = pooling.window_for_length(length, count)
    elif official:  # semi-dynamic on a token backbone, as the paper's code chooses lengths
        count = selector.official_select_length(y, length, scale, config.lengths, dtype)
        window = 0
    else:  # semi-dynamic on a token backbone: length-based DRS (Eq. 4-5)
        count = selector.select_length(
            y, length, scale, config.lengths, config.quantize, config.compare_space
        )
        window = 0
    return backbone.parameter(config, window, count, length)


def extract(
    config: CompressorConfig,
    hidden: torch.Tensor,
    num_tokens: int,
    parameter: int,
    ratio: float | None = None,
) -> torch.Tensor:
    """Apply ``config.backbone`` to one row of encoder states ``[T, d]``; returns ``[M, d]``.

    ``parameter`` comes from `structure`, ``ratio`` is the explicit one passed to it. A ratio the
    head did not choose (fixed modes, explicit ``ratio``) pools with
    ``config.fixed_ratio_alignment`` when that is set.
    """
    fixed = fixed_by_mode(config, ratio)
    return get(config.backbone).extract(config, hidden, num_tokens, parameter, fixed)


def segment_count(num_tokens: int, segment_tokens: int) -> int:
    """How many encoder segments a text of ``num_tokens`` tokens is split into (at least one)."""
    return max(1, math.ceil(num_tokens / segment_tokens))


def min_latents(config: CompressorConfig, num_tokens: int, ratio: float | None = None) -> int:
    """A lower bound on the latents a text of ``num_tokens`` tokens becomes: at the largest ratio
    the selector may pick (or the fixed or explicit one), at least one per segment."""
    segments = segment_count(num_tokens, config.max_segment_tokens)
    given = _given_ratio(config, ratio)
    top = given if given is not None else max(config.ratios)
    return max(segments, get(config.backbone).fewest_latents(num_tokens, top))
