"""semidyn_rag.prompting: one chat rendering and one prepare pass for both integrations."""

from __future__ import annotations

import pytest

from semidyn_rag.policy import CompressionPolicy
from semidyn_rag.prompting import (
    METADATA_PREFIX,
    check_window,
    chunk_metadata,
    expanded_metadata,
    prepare_prompt,
    render_messages,
)
from semidyn_rag.service import (
    ContextWindowError,
    LatentDeliveryError,
    LatentService,
    UnknownMarkerError,
    marker,
)

TEXTS = ["Alice was born in 1990 in Lyon.", "Bob moved to Oslo in 2004 with his sister."]


def test_render_keeps_system_and_user_text_in_order() -> None:
    chat = [
        ("system", "Answer briefly."),
        ("human", "first"),
        ("assistant", "an earlier answer"),
        ("tool", "tool output"),
        ("user", ""),
        ("user", "second"),
    ]
    assert render_messages(chat) == "Answer briefly.\n\nfirst\n\nsecond"


@pytest.mark.parametrize("chat", [[], [("assistant", "only me")], [("user", None), ("user", "")]])
def test_a_chat_without_user_text_is_an_error(chat) -> None:
    with pytest.raises(ValueError, match="at least one system or user"):
        render_messages(chat)


def test_prepare_parses_once_and_counts_positions(compressor) -> None:
    service = LatentService(compressor)
    chunks = service.compress(TEXTS, ratio=2)
    prompt = service.qa_template("\n".join(c.marker for c in chunks), "Who?")
    prepared = prepare_prompt(service, prompt)
    assert prepared.slots == tuple(c.slot for c in chunks)
    assert prepared.keys == tuple(c.key for c in chunks)
    assert prepared.latent_positions == sum(c.context.num_latents for c in chunks)
    assert prepared.positions == compressor.prompt_positions(prepared.prompt)
    assert len(prepared.prompt.latents) == 2
    # nothing used yet: the decoding call uses the slots
    assert service.complete(prepared.resolved, max_new_tokens=2) is not None
    assert prepare_prompt(service, prompt).slots == ()  # used: text from now on


def test_prepare_refuses_what_the_window_cannot_hold(compressor) -> None:
    service = LatentService(compressor)
    chunks = service.compress(TEXTS, ratio=2)
    prompt = service.qa_template("\n".join(c.marker for c in chunks), "Who?")
    positions = prepare_prompt(service, prompt).positions
    with pytest.raises(ContextWindowError, match=rf"{positions} decoder positions.*window of"):
        prepare_prompt(service, prompt, window=positions + 3, max_new_tokens=4)
    prepared = prepare_prompt(service, prompt, window=positions + 4, max_new_tokens=4)
    with pytest.raises(ContextWindowError, match="max_length"):  # one answer position at least
        check_window(prepared, positions, max_length=positions)
    check_window(prepared, positions + 1, max_length=positions)
    with pytest.raises(LatentDeliveryError, match="cannot read latent markers"):
        prepare_prompt(service, prompt, adapter=False)
    assert prepare_prompt(service, "plain text", adapter=False).positions > 0


def test_prepare_raises_for_a_marker_without_latents(compressor) -> None:
    service = LatentService(compressor)
    with pytest.raises(UnknownMarkerError):
        prepare_prompt(service, f"Context: {marker('f' * 64)}")


def test_chunk_metadata_is_the_same_for_both_frameworks(compressor) -> None:
    [chunk] = LatentService(compressor).compress(TEXTS[:1])
    meta = chunk_metadata(chunk, compression=CompressionPolicy(scale=0.5), original_text=TEXTS[0])
    assert meta["semidyn_key"] == chunk.key
    assert meta["semidyn_num_latents"] == chunk.context.num_latents
    assert meta["semidyn_expanded"] is False and meta["semidyn_scale"] == 0.5
    assert meta["semidyn_original_text"] == TEXTS[0]
    assert all(k.startswith(METADATA_PREFIX) for k in meta)
    fixed = chunk_metadata(chunk, compression=CompressionPolicy(ratio=4), original_text=None)
    assert "semidyn_original_text" not in fixed and fixed["semidyn_scale"] is None
    assert expanded_metadata(None) == {"semidyn_expanded": True}
