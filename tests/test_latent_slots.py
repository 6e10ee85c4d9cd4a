"""Core: user text never acts as a latent slot (a slot serves one call); limits; empty inputs."""

from __future__ import annotations

import pytest
import torch

from semidyn_rag import service as service_module
from semidyn_rag.modeling import PLACEHOLDER, LatentPrompt
from semidyn_rag.service import (
    IncompleteContextError,
    LatentDeliveryError,
    LatentService,
    MalformedMarkerError,
    UnknownMarkerError,
    _SlotRegistry,
    expect_delivery,
    marker,
    parse_prompt,
)

TEXT = "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister."


def test_private_use_character_in_question_and_context_is_text(compressor):
    question = f"Where {PLACEHOLDER} was Alice born?"
    context = f"Alice {PLACEHOLDER} was born in Lyon."
    [prompt] = compressor.prompts_for([question], [[context]])
    assert len(prompt.latents) == 1 and question in prompt.pieces[-1]
    assert compressor.generate(question, [context], max_new_tokens=3)  # no slot-count error
    plain = LatentPrompt.from_parts(
        [compressor.config.prompt_template.format(context=context, question=question)]
    )
    assert compressor.complete([plain], adapter=False, max_new_tokens=3)  # the text baseline
    with pytest.raises(ValueError, match="2 placeholders but 1 latents"):
        LatentPrompt(f"{PLACEHOLDER}{PLACEHOLDER}", [torch.zeros(1, 4)])  # the string form


def test_rendered_pieces_keep_latents_where_the_parts_put_them(compressor):
    [a] = compressor.compress([TEXT], ratio=4)
    prompt = LatentPrompt.from_parts([f"x{PLACEHOLDER}y ", a.latents, f" <<slot:{'0' * 32}>>"])
    embeds, mask, _ = compressor.embed_prompts([prompt])
    assert int(mask.sum()) == compressor.prompt_positions(prompt)
    table = compressor.decoder.get_input_embeddings()
    before, after = compressor.latent_decoder.render_pieces(prompt.pieces)
    assert after.startswith(" <<slot:")  # a slot-shaped text stays text
    ids = compressor.decoder_tokenizer([before], add_special_tokens=False)["input_ids"][0]
    start = len(ids)
    torch.testing.assert_close(embeds[0, start : start + a.num_latents], a.latents)
    torch.testing.assert_close(embeds[0, :start], table(torch.tensor(ids)))


def test_markers_only_resolve_when_issued_here(compressor):
    service = LatentService(compressor)
    [chunk] = service.compress([TEXT])
    assert len(service.resolve(chunk.marker).latents) == 1
    for text in (f"[[latent:{chunk.key}]]", f"[[latent:{'ab' * 16}]]"):
        assert service.resolve(text).latents == ()  # forged: plain text
    with pytest.raises(UnknownMarkerError, match="never compressed"):
        service.resolve(marker("0" * 64))  # issued here for a key nobody stored
    [fresh] = service.compress([TEXT])
    with pytest.raises(MalformedMarkerError):
        service.resolve(fresh.marker[:30])


def test_empty_inputs(compressor):
    assert compressor.compress([]) == []
    assert compressor.compress_tokens([]) == []
    assert LatentService(compressor).compress([]) == []


def test_generation_limits_are_honoured(compressor):
    [prompt] = compressor.prompts_for(["Who?"], [[TEXT]])
    eos = compressor.decoder_tokenizer.eos_token_id
    no_eos = {"suppress_tokens": [eos]}
    tok = compressor.decoder_tokenizer

    def count(**kwargs) -> int:
        text = compressor.complete([prompt], **no_eos, **kwargs)[0]
        return len(tok(text, add_special_tokens=False)["input_ids"])

    positions = compressor.prompt_positions(prompt)
    kwargs = compressor.latent_decoder.generation_kwargs({"max_length": positions + 3})
    assert "max_new_tokens" not in kwargs  # max_length is the caller's limit, not overridden
    assert count(max_new_tokens=2) <= 2
    assert compressor.latent_decoder.generation_kwargs({"temperature": 0.7})["do_sample"] is True
    assert compressor.latent_decoder.generation_kwargs({"temperature": 0.0})["do_sample"] is False
    torch.manual_seed(0)
    sampled = {
        compressor.complete([prompt], temperature=5.0, max_new_tokens=8)[0] for _ in range(4)
    }
    assert len(sampled) > 1


# ---------------------------------------------------------------- a slot serves one call


@pytest.fixture
def no_pending():
    expect_delivery([], "")
    yield
    expect_delivery([], "")


def test_a_slot_carries_latents_into_one_call_only(compressor, no_pending):
    service = LatentService(compressor)
    [chunk] = service.compress([TEXT])
    prompt = service.qa_template(chunk.marker, "Where was Alice born?")
    # looking never uses: parsing, listing, counting, resolving with use=False
    assert [s.id for s in service.slots(prompt)] == [chunk.slot.id]
    assert any(not isinstance(p, str) for p in parse_prompt(prompt, check_fragments=False))
    assert len(service.resolve(prompt, use=False).latents) == 1
    assert len(service.resolve(prompt).latents) == 1  # the call it was issued for
    # the same marker seen again (copied into a later question, a chat history) is text
    later = service.qa_template("", f"{chunk.marker} Where was Alice born?")
    again = service.resolve(later)
    assert again.latents == () and chunk.marker in again.pieces[0]
    assert service.slots(prompt) == []
    assert service.resolve(chunk.marker[:30]).latents == ()  # a piece of a used one: text


def test_leaked_marker_from_a_grouped_query_does_not_break_another_query(compressor, no_pending):
    """Five chunks retrieved together; one of their markers pasted into a later question."""
    service = LatentService(compressor)
    texts = [f"{TEXT} Passage {i}." for i in range(5)]
    chunks = service.compress(texts, group=True)
    first = service.qa_template("\n".join(c.marker for c in chunks), "Who?")
    expect_delivery([c.slot for c in chunks], "Who?")
    assert len(service.resolve(first, whole_groups=True).latents) == 5
    [other] = service.compress(["Bob moved to Oslo."], group=True)
    question = f"What does {chunks[2].marker} mean?"
    expect_delivery([other.slot], question)
    prompt = service.qa_template(other.marker, question)
    resolved = service.resolve(prompt, whole_groups=True)  # no IncompleteContextError
    assert len(resolved.latents) == 1 and chunks[2].marker in resolved.pieces[1]


def test_a_live_marker_of_another_query_is_text_in_this_query(compressor, no_pending):
    """Issued for a retrieval whose answer never ran (no call used it), then pasted."""
    service = LatentService(compressor)
    leaked = service.compress([f"{TEXT} a", f"{TEXT} b"], group=True)
    [mine] = service.compress(["Bob moved to Oslo."])
    question = f"Is {leaked[0].marker} right?"
    expect_delivery([mine.slot], question)
    resolved = service.resolve(service.qa_template(mine.marker, question), whole_groups=True)
    assert len(resolved.latents) == 1  # not an IncompleteContextError for the leaked group
    assert service.slots(leaked[0].marker)  # still live for its own query, unused


def test_a_grouped_prompt_missing_a_chunk_still_fails(compressor, no_pending):
    service = LatentService(compressor)
    chunks = service.compress([f"{TEXT} a", f"{TEXT} b"], group=True)
    expect_delivery([c.slot for c in chunks], "Who?")
    with pytest.raises(IncompleteContextError):
        service.resolve(service.qa_template(chunks[0].marker, "Who?"), whole_groups=True)
    assert len(service.slots(chunks[0].marker)) == 1  # a refused call uses nothing


def test_evicted_before_use_is_an_error_used_is_text(compressor, monkeypatch):
    registry = _SlotRegistry(capacity=2, remembered=64)
    monkeypatch.setattr(service_module, "_SLOTS", registry)
    service = LatentService(compressor)
    used, evicted = service.compress([TEXT, TEXT + " 2"])
    service.resolve(used.marker)
    service.compress(["x", "y"])  # pushes the unused one out of the live slots
    with pytest.raises(UnknownMarkerError, match="expired before any call read it"):
        service.resolve(evicted.marker)
    assert service.resolve(used.marker).latents == ()
    for i in range(80):  # past the remembered window: an old id is text either way
        service.compress([f"z{i}"])
    assert service.resolve(evicted.marker).latents == ()


def test_a_failed_decode_gives_the_slots_back(compressor, monkeypatch):
    service = LatentService(compressor)
    [chunk] = service.compress([TEXT])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(compressor, "complete", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        service.complete(chunk.marker, max_new_tokens=2)
    monkeypatch.undo()
    assert len(service.slots(chunk.marker)) == 1  # a retry still reads the latents
    service.complete(chunk.marker, max_new_tokens=2)
    assert service.slots(chunk.marker) == []


def test_one_call_uses_shared_slots_once_and_a_race_is_an_error(compressor):
    service = LatentService(compressor)
    [chunk] = service.compress([TEXT])
    a = service.prepare(f"A {chunk.marker}")
    b = service.prepare(f"B {chunk.marker}")
    service.use(a, b)  # one batched call: both prompts read the chunk
    assert service.slots(chunk.marker) == []
    [other] = service.compress([TEXT])
    first, second = service.prepare(other.marker), service.prepare(other.marker)
    service.use(first)
    with pytest.raises(LatentDeliveryError, match="used by another call"):
        service.use(second)
