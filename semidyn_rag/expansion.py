"""Query-time selective expansion: the chunks that matter go to the decoder as text, the rest as latents.

Soft compression makes every retrieved chunk equally lossy. With an expansion budget ``k`` the
``k`` chunks a policy picks keep their plain text in the prompt and the others are read from their
latents, in one prompt that keeps the retrieval order (text and latent spans interleaved as the
chunks came). The default policy, :class:`TopScorePolicy`, expands the chunks the retriever scored
highest; :class:`DensityPolicy` expands those the ratio head rates densest (the chunks compression
would hurt most). Any object with ``needs_contexts`` and ``choose`` is a policy
(:class:`ExpansionPolicy`); :func:`choose_expanded` validates what it returns.

This module holds no framework code: the LlamaIndex postprocessor and the LangChain document
compressor call :meth:`semidyn_rag.service.LatentService.compress_selectively`, which calls
:func:`choose_expanded`, and the evaluation builds its prompts with :func:`mixed_prompt`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .modeling import LatentPrompt, SemiDynamicCompressor
    from .types import CompressedContext

__all__ = [
    "Candidate",
    "DensityPolicy",
    "ExpansionPolicy",
    "ExpansionPolicyError",
    "TopScorePolicy",
    "check_budget",
    "choose_expanded",
    "mixed_prompt",
]


class ExpansionPolicyError(ValueError):
    """A policy returned something that is not a valid choice (not positions, a position out of
    range or given twice, more than the budget)."""


@dataclass(frozen=True)
class Candidate:
    """One retrieved chunk offered for expansion, at its retrieval position in the sequence."""

    text: str
    """The text that would reach the decoder if expanded (what the encoder would compress)."""
    score: float | None = None
    """The retriever's (or a reranker's) relevance score, higher is better; ``None``: unknown."""
    context: CompressedContext | None = None
    """The chunk's latents and the ratio head's prediction; given only to policies with
    ``needs_contexts`` (store and memory hits cost nothing, the rest one encoder batch). A copy:
    writing into its latents changes nothing the service keeps or sends."""


@runtime_checkable
class ExpansionPolicy(Protocol):
    """Chooses which retrieved chunks go to the decoder as text.

    ``needs_contexts``: whether :meth:`choose` reads ``Candidate.context`` (then every chunk is
    compressed before the choice; otherwise only the chunks left compressed are).
    """

    needs_contexts: bool

    def choose(self, query: str, candidates: Sequence[Candidate], k: int) -> set[int]:
        """Positions (``0 <= i < len(candidates)``) of at most ``k`` candidates to expand.

        Called only with ``0 < k < len(candidates)``; returning fewer than ``k`` is allowed
        (a policy may decide that no further chunk is worth its text). Any iterable of distinct
        integer positions will do (a set, a list, NumPy integers); `choose_expanded` checks it.
        """
        ...


def _retrieval_rank(candidates: Sequence[Candidate]) -> list[int]:
    """Positions by score, highest first; unscored after scored; ties keep retrieval order."""
    for i, c in enumerate(candidates):
        if c.score is not None and not math.isfinite(c.score):
            raise ValueError(f"chunk {i} has a non-finite retrieval score {c.score!r}")
    return sorted(
        range(len(candidates)),
        key=lambda i: (candidates[i].score is None, -(candidates[i].score or 0.0), i),
    )


class TopScorePolicy:
    """Expand the ``k`` chunks the retriever scored highest (the default).

    Ties, and chunks without a score (ranked after scored ones), keep retrieval order, so without
    any scores the first ``k`` retrieved chunks expand. A NaN or infinite score is a ``ValueError``.
    """

    needs_contexts = False

    def choose(self, query: str, candidates: Sequence[Candidate], k: int) -> set[int]:
        return set(_retrieval_rank(candidates)[:k])

    def __repr__(self) -> str:
        return "TopScorePolicy()"


class DensityPolicy:
    """Expand the ``k`` chunks the ratio head rates densest: the lowest predicted ``y``.

    The head predicts ``y = log2(compression ratio)`` for each segment of a chunk
    (`CompressedContext.segment_y`); a low ``y`` means little redundancy, so the chunk loses the
    most when compressed. A chunk's density is the token-unweighted mean of its segments' ``y``.
    Ties fall back to the retriever's ranking (:class:`TopScorePolicy`). Raises ``ValueError`` when
    a candidate has no context or the compressor has no ratio head (``y`` is NaN: a fixed-ratio
    checkpoint), since the choice would otherwise be arbitrary.
    """

    needs_contexts = True

    def choose(self, query: str, candidates: Sequence[Candidate], k: int) -> set[int]:
        rank = {pos: r for r, pos in enumerate(_retrieval_rank(candidates))}
        ys = []
        for i, c in enumerate(candidates):
            if c.context is None:
                raise ValueError(f"DensityPolicy needs the latents of chunk {i}; none were given")
            finite = [y for y in c.context.segment_y if math.isfinite(y)]
            if not finite:
                raise ValueError(
                    f"chunk {i} has no ratio-head prediction (y is NaN): this compressor has no "
                    "ratio head; use TopScorePolicy"
                )
            ys.append(sum(finite) / len(finite))
        order = sorted(range(len(candidates)), key=lambda i: (ys[i], rank[i]))
        return set(order[:k])

    def __repr__(self) -> str:
        return "DensityPolicy()"


def check_budget(k: object) -> int:
    """``k`` as an expansion budget: an ``int >= 0``; anything else is a ``ValueError``/``TypeError``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"expand_top_k must be an int >= 0, got {k!r}")
    if k < 0:
        raise ValueError(f"expand_top_k must be >= 0 (0: every chunk as latents), got {k}")
    return k


def choose_expanded(
    policy: ExpansionPolicy, query: str, candidates: Sequence[Candidate], k: int
) -> frozenset[int]:
    """The positions to expand under budget ``k``, checked.

    ``k == 0`` expands nothing and ``k >= len(candidates)`` expands every chunk, without asking the
    policy (a budget larger than the retrieval is not an error: all chunks go as text). Otherwise
    the policy chooses and may return any iterable of integer positions (NumPy integers included);
    `ExpansionPolicyError` when it returns something that is not an iterable, a position that is
    not an integer or is out of range, a position more than once, or more than ``k`` positions.
    Negative ``k`` is a ``ValueError``.
    """
    k = check_budget(k)
    n = len(candidates)
    if k == 0 or n == 0:
        return frozenset()
    if k >= n:
        return frozenset(range(n))
    returned = policy.choose(query, candidates, k)
    if isinstance(returned, (str, bytes)) or not isinstance(returned, Iterable):
        raise ExpansionPolicyError(
            f"{policy!r} returned a {type(returned).__name__} ({returned!r}); choose must return "
            "the positions to expand (e.g. a set of ints)"
        )
    chosen = list(returned)  # once: a generator is read a single time
    odd = [i for i in chosen if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if odd:
        raise ExpansionPolicyError(f"{policy!r} chose {odd}: not integer positions")
    positions = [int(i) for i in chosen]
    bad = [i for i in positions if not 0 <= i < n]
    if bad:
        raise ExpansionPolicyError(
            f"{policy!r} chose positions {bad}, outside the {n} candidates (0..{n - 1})"
        )
    twice = sorted({i for i in positions if positions.count(i) > 1})
    if twice:
        raise ExpansionPolicyError(
            f"{policy!r} chose position {twice[0]} more than once ({positions}); a policy "
            "returns each chunk to expand once"
        )
    if len(positions) > k:
        raise ExpansionPolicyError(
            f"{policy!r} chose {len(positions)} chunks to expand, more than the budget k={k}"
        )
    return frozenset(positions)


def mixed_prompt(
    compressor: SemiDynamicCompressor, question: str, contexts: Sequence[str | torch.Tensor]
) -> LatentPrompt:
    """The training prompt around ``contexts`` in order, each plain text or a latent span.

    `SemiDynamicCompressor.latent_prompt`: the layout the frameworks produce, contexts one per
    line in the template's context slot, a text context read as text, a ``[n, decoder_hidden]``
    tensor as its latent positions. No contexts: the question alone.
    """
    return compressor.latent_prompt(question, contexts)
