"""Hard (text) compression peers of the soft compressor: token budgets and truncation.

A peer shortens each context *as text* and the untouched base decoder reads what is left, so it
is compared with the soft compressor on the same decoder, the same questions and the same budget.
For a context of ``n`` decoder tokens and a ratio ``r`` the budget is ``ceil(n / r)`` tokens: the
number of latent positions the fixed-ratio compressor gives it (one per ``r``-token window).

Everything here is pure: tokenizers come in as two callables (``encode``, ``decode``), so the
arithmetic is tested without a model. The LLMLingua peers live in :mod:`semidyn_rag.lingua`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "PEER_KINDS",
    "HardCompression",
    "PeerKind",
    "token_budget",
    "truncate_ids",
    "truncate_texts",
]

PeerKind = Literal["truncation", "llmlingua", "longllmlingua"]
PEER_KINDS: tuple[PeerKind, ...] = ("truncation", "llmlingua", "longllmlingua")
"""``truncation``: the first ``ceil(n/r)`` tokens of each context; ``llmlingua``: question-unaware
LLMLingua; ``longllmlingua``: question-aware LongLLMLingua (both scored by the base LM)."""

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]
_REPLACEMENT = "\ufffd"


def token_budget(num_tokens: int, ratio: float) -> int:
    """Tokens a context of ``num_tokens`` keeps at compression ``ratio``: ``ceil(num_tokens / ratio)``.

    At least one token for a non-empty context (as the compressor keeps at least one latent), zero
    for an empty one. Raises ``ValueError`` for ``ratio < 1`` (that would lengthen the text) or a
    negative count.
    """
    if not ratio >= 1:  # also catches NaN
        raise ValueError(f"compression ratio must be >= 1, got {ratio}")
    if num_tokens < 0:
        raise ValueError(f"token count must be >= 0, got {num_tokens}")
    return math.ceil(num_tokens / ratio)


def truncate_ids(ids: Sequence[int], ratio: float) -> list[int]:
    """The first ``token_budget(len(ids), ratio)`` token ids."""
    return list(ids[: token_budget(len(ids), ratio)])


def truncate_texts(
    texts: Sequence[str], ratio: float, encode: Encode, decode: Decode
) -> list[tuple[str, int, int]]:
    """Each text cut to its first ``ceil(n / r)`` tokens: ``(kept text, kept, n)`` per text.

    ``encode`` must not add special tokens. A cut that would split a multi-byte character (decoded
    as U+FFFD where the whole text has none) moves back before it, so the kept text is always a
    prefix of the text and keeps *at most* the budget (the count says how many).
    """
    out = []
    for text in texts:
        ids = encode(text)
        head = truncate_ids(ids, ratio)
        keep, kept = len(head), decode(head)
        while keep and kept.endswith(_REPLACEMENT) and not text.startswith(kept):
            keep -= 1
            kept = decode(ids[:keep])
        out.append((kept, keep, len(ids)))
    return out


@dataclass(frozen=True)
class HardCompression:
    """One question's contexts after a text-compression peer.

    ``text`` replaces the contexts in the base decoder's prompt; ``kept_tokens`` is its length in
    decoder tokens and ``original_tokens`` that of the contexts, so their quotient is the ratio the
    peer *reached* (LLMLingua does not always reach the one requested). ``seconds`` is the wall time
    the peer spent on this question.
    """

    text: str
    original_tokens: int
    kept_tokens: int
    seconds: float
    context_ratios: tuple[float, ...] = ()
    """Reached ratio per context when the peer keeps contexts apart (truncation), else empty."""

    @property
    def ratio(self) -> float:
        """Reached compression ``original_tokens / kept_tokens`` (``inf`` when nothing is kept)."""
        return self.original_tokens / self.kept_tokens if self.kept_tokens else math.inf
