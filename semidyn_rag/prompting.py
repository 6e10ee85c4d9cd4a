"""What a framework's LLM call needs between its prompt text and the decoder, framework-free.

The LangChain and LlamaIndex packages translate their objects and call these:

* `chunk_metadata` / `expanded_metadata`: what a compressed (or expanded) chunk's document or
  node carries, the same keys in both frameworks;
* `render_messages`: a chat becomes the one user prompt the decoder was trained on;
* `prepare_prompt`: **one pass per call** over the prompt text. It parses the markers once
  (`LatentService.prepare`: live slots checked, their latents read from memory or the store
  once), counts the decoder positions once and refuses a prompt that cannot fit, before any
  slot is used or any decoding starts. Its `PreparedPrompt` carries the `LatentPrompt` (text
  pieces with each slot's latents between them, the one form a slot has from here to the
  decoder) into `LatentService.complete` / `stream`, which use the slots and decode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from .modeling import LatentPrompt
from .policy import CompressionPolicy
from .service import (
    ChunkLatents,
    ContextWindowError,
    LatentDeliveryError,
    LatentService,
    ResolvedPrompt,
    Slot,
)
from .types import CompressedContext

logger = logging.getLogger(__name__)

METADATA_PREFIX = "semidyn_"
"""Every metadata key the integrations add starts with it (flat keys suit metadata filters)."""


def chunk_metadata(
    chunk: ChunkLatents, *, compression: CompressionPolicy, original_text: str | None
) -> dict[str, Any]:
    """Metadata for a chunk that reaches the LLM as its marker, keys prefixed ``semidyn_``.

    ``compression`` is the ratio policy the chunk was compressed under. Keys: ``key`` (cache
    key), ``ratio``, ``segment_ratios``, ``num_latents``, ``original_tokens``, ``source``
    (``encoder``, ``store`` or ``memory``), ``scale`` (the policy's
    `~CompressionPolicy.selector_scale`: ``None`` under a fixed ratio), ``expanded``
    (``False``), the ratio head's ``predicted_y`` when it ran, and the chunk's ``original_text``
    unless ``None`` (for citations; it never reaches the prompt).
    """
    ctx = chunk.context
    extra: dict[str, Any] = {
        "key": chunk.key,
        "ratio": ctx.ratio,
        "segment_ratios": list(ctx.segment_ratios),
        "num_latents": ctx.num_latents,
        "original_tokens": ctx.num_tokens,
        "source": chunk.source,
        "scale": compression.selector_scale,
        "expanded": False,
    }
    if math.isfinite(ctx.predicted_y):
        extra["predicted_y"] = ctx.predicted_y
    if original_text is not None:
        extra["original_text"] = original_text
    return {METADATA_PREFIX + k: v for k, v in extra.items()}


def expanded_metadata(original_text: str | None) -> dict[str, Any]:
    """Metadata for a chunk that reaches the LLM as its plain text (selective expansion)."""
    extra: dict[str, Any] = {"expanded": True}
    if original_text is not None:
        extra["original_text"] = original_text
    return {METADATA_PREFIX + k: v for k, v in extra.items()}


USER_ROLES = frozenset({"system", "user", "human"})
"""Roles whose text reaches the decoder (``human`` is LangChain's name for ``user``)."""


def render_messages(messages: Iterable[tuple[str | None, str | None]]) -> str:
    """The single user prompt for a chat given as ``(role, text)`` pairs, in order.

    The decoder was trained on single-turn prompts (one user message, rendered with its own chat
    template), so the texts of the system and user messages are joined by blank lines. Assistant,
    tool and function messages are left out: the decoder never saw multi-turn histories, and an
    earlier answer is not evidence. Messages without text are skipped. Raises ``ValueError`` when
    no system or user message has text (there would be nothing to answer).
    """
    kept: list[str] = []
    dropped = 0
    for role, text in messages:
        if role not in USER_ROLES:
            dropped += 1
        elif text:
            kept.append(text)
    if dropped:
        logger.debug("left %d assistant/tool message(s) out of the prompt", dropped)
    if not kept:
        raise ValueError(
            "a chat for the semi-dynamic decoder needs at least one system or user (human) "
            "message with text; assistant and tool messages are left out of its prompt"
        )
    return "\n\n".join(kept)


@dataclass(frozen=True)
class PreparedPrompt:
    """One call's prompt after `prepare_prompt`: resolved, counted, checked; no slot used yet."""

    resolved: ResolvedPrompt
    """The service's resolution: the `LatentPrompt`, its slots and their latents."""
    positions: int
    """Decoder input positions: the rendered text's tokens plus every latent position."""

    @property
    def prompt(self) -> LatentPrompt:
        """What the decoder reads: text pieces with each slot's latents ``[n, d_dec]`` between."""
        return self.resolved.prompt

    @property
    def slots(self) -> tuple[Slot, ...]:
        """The slots that expand to latents, in prompt order."""
        return self.resolved.slots

    @property
    def contexts(self) -> tuple[CompressedContext, ...]:
        """Each slot's latents and chosen ratio, in the same order."""
        return self.resolved.contexts

    @property
    def keys(self) -> tuple[str, ...]:
        """Each slot's chunk cache key, in the same order."""
        return self.resolved.keys

    @property
    def as_text(self) -> tuple[Slot, ...]:
        """Live slots whose markers this call reads as text (not issued for it)."""
        return self.resolved.as_text

    @property
    def latent_positions(self) -> int:
        """The latent positions among `positions`."""
        return sum(int(t.shape[0]) for t in self.prompt.latents)


def prepare_prompt(
    service: LatentService,
    prompt: str,
    *,
    whole_groups: bool = False,
    delivered: Collection[str] | None = None,
    newest_only: bool = False,
    window: int | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    adapter: bool = True,
) -> PreparedPrompt:
    """Resolve ``prompt`` for one LLM call, count its decoder positions and check that it fits.

    ``whole_groups``, ``delivered`` and ``newest_only`` choose which live markers carry latents
    (`LatentService.prepare`, whose `LatentDeliveryError` subclasses propagate). ``window`` is the
    decoder's position budget (``None``: unchecked); the answer needs ``max_new_tokens`` more, or,
    without it, HF's ``max_length`` counts the prompt too (at least one answer position). A
    prompt over the budget is a `ContextWindowError`. ``adapter=False`` (the base decoder, which
    never learned to read latents) refuses a prompt that expands any marker with a
    `LatentDeliveryError`. No slot is used: `LatentService.complete` / `stream` (given
    ``.resolved``) or `LatentService.use` do that.
    """
    resolved = service.prepare(
        prompt, whole_groups=whole_groups, delivered=delivered, newest_only=newest_only
    )
    if resolved.prompt.latents and not adapter:  # not a ValueError: LlamaIndex's Refine drops those
        raise LatentDeliveryError(
            "adapter=False runs the base decoder, which cannot read latent markers; give it "
            "the chunks' plain text"
        )
    prepared = PreparedPrompt(resolved, service.compressor.prompt_positions(resolved.prompt))
    if window is not None:
        check_window(prepared, window, max_new_tokens=max_new_tokens, max_length=max_length)
    return prepared


def check_window(
    prepared: PreparedPrompt,
    window: int,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
) -> None:
    """Raise `ContextWindowError` when ``prepared`` plus its answer exceed ``window`` positions.

    The answer takes ``max_new_tokens`` positions; without it HF's ``max_length`` bounds prompt
    and answer together (and leaves at least one position for the answer).
    """
    positions = prepared.positions
    if max_new_tokens is not None:
        needed = positions + int(max_new_tokens)
        what = f"plus max_new_tokens {int(max_new_tokens)} = {needed}"
    elif max_length is not None:
        needed = max(positions + 1, int(max_length))
        what = f"with max_length {int(max_length)}: {needed}"
    else:
        needed, what = positions + 1, f"plus one answer token = {positions + 1}"
    if needed > window:
        raise ContextWindowError(
            f"the prompt needs {positions} decoder positions ({prepared.latent_positions} of "
            f"them latents) {what}, more than the context window of {window} positions: "
            "retrieve fewer chunks, compress harder (a higher scale) or lower max_tokens "
            "(max_new_tokens)"
        )
