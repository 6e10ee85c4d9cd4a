"""SemiDynamicLLM: markers resolve to latents, real streaming, chat derivation, errors."""

from __future__ import annotations

import pytest
import torch
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from semidyn_rag.modeling import LatentPrompt
from semidyn_rag.service import marker
from semidyn_rag.testing import PASSAGES as CORPUS

from llama_index.llms.semidyn import (
    LatentDeliveryError,
    MalformedMarkerError,
    SemiDynamicLLM,
    UnknownMarkerError,
    render_messages,
)

MAX_NEW = 8
QUESTION = "Where was Alice born?"


@pytest.fixture
def llm(service) -> SemiDynamicLLM:
    return SemiDynamicLLM(service, max_new_tokens=MAX_NEW)


@pytest.fixture
def make_prompt(service):
    """Builds the training prompt with two compressed chunks, as a query engine would.

    Each call issues fresh markers for the same latents: a slot serves one LLM call.
    """

    def make() -> str:
        chunks = service.compress(CORPUS[:2])
        return service.qa_template("\n".join(c.marker for c in chunks), QUESTION)

    return make


@pytest.fixture
def prompt(make_prompt) -> str:
    return make_prompt()


def test_complete_reads_the_latents_of_the_markers(llm, service, prompt):
    got = llm.complete(prompt, formatted=True)
    model = service.compressor
    latents = [c.context.latents for c in service.compress(CORPUS[:2])]
    direct = LatentPrompt(model.format_prompt(QUESTION, 2), latents)
    assert got.text == model.complete([direct], max_new_tokens=MAX_NEW)[0]
    assert len(got.additional_kwargs["latent_keys"]) == 2


def test_prompt_without_markers_is_plain_generation(llm, service):
    got = llm.complete("Name a capital city.").text
    want = service.compressor.complete(
        [LatentPrompt("Name a capital city.")], max_new_tokens=MAX_NEW
    )
    assert got == want[0]


@pytest.fixture
def sampler(service) -> SemiDynamicLLM:
    """Decodes whole words only (every other token suppressed, ``<eos>`` included).

    Random weights mostly pick byte tokens; a text streamer holds those back until a space, so
    the whole answer would come out as one piece. Space-led word tokens flush one by one.
    """
    vocab = service.compressor.decoder_tokenizer.get_vocab()
    banned = [i for tok, i in vocab.items() if not (tok[:1] == "Ġ" and tok[1:].isalpha())]
    return SemiDynamicLLM(service, max_new_tokens=12, generate_kwargs={"suppress_tokens": banned})


def test_stream_complete_yields_pieces_that_join_to_complete(sampler, make_prompt):
    pieces = list(sampler.stream_complete(make_prompt(), formatted=True))
    assert len(pieces) > 1  # real token streaming, not one final chunk
    assert "".join(p.delta for p in pieces) == pieces[-1].text
    assert pieces[-1].text == sampler.complete(make_prompt(), formatted=True).text


def test_unknown_marker_is_a_clear_error(llm, service):
    ghost = marker("0" * 64)
    bad = service.qa_template(ghost, QUESTION)
    with pytest.raises(UnknownMarkerError, match="never compressed"):
        llm.complete(bad, formatted=True)
    with pytest.raises(UnknownMarkerError):
        llm.stream_complete(bad, formatted=True)  # raised before the first token


@pytest.mark.parametrize("cut", [11, 20, 30, 40, 49, 50])
def test_cut_marker_is_refused_on_either_side(llm, prompt, cut):
    """A marker split at any character fails the call that holds its larger piece.

    The error is a ``LatentDeliveryError``, a ``RuntimeError``: LlamaIndex's Refine swallows
    ``ValueError``/``TypeError`` as bad model output, and must not swallow it.
    """
    failed = 0
    for piece in (prompt[:cut], prompt[cut:]):
        try:
            llm.complete(piece, formatted=True)
        except LatentDeliveryError as error:
            assert not isinstance(error, (ValueError, TypeError))
            failed += 1
    assert failed >= 1
    with pytest.raises(MalformedMarkerError, match="piece of a latent marker"):
        llm.complete(prompt[:40], formatted=True)


def test_metadata(llm, service):
    meta = llm.metadata
    config = service.compressor.decoder.get_base_model().config
    assert meta.context_window == config.max_position_embeddings
    assert meta.num_output == MAX_NEW
    assert meta.is_chat_model is False
    assert SemiDynamicLLM(service, context_window=512).metadata.context_window == 512


def test_chat_goes_through_completion(llm, make_prompt):
    def messages(prompt: str) -> list[ChatMessage]:
        return [
            ChatMessage(role=MessageRole.ASSISTANT, content="earlier answer"),
            ChatMessage(role=MessageRole.USER, content=prompt),
        ]

    prompt = make_prompt()
    assert render_messages(messages(prompt)) == prompt
    reply = llm.chat(messages(prompt))
    assert reply.message.role == MessageRole.ASSISTANT
    assert reply.message.content == llm.complete(make_prompt(), formatted=True).text
    streamed = list(llm.stream_chat(messages(make_prompt())))
    assert streamed[-1].message.content == reply.message.content
    with pytest.raises(ValueError, match="at least one system or user"):  # nothing to answer
        llm.chat([ChatMessage(role=MessageRole.ASSISTANT, content="only me")])
    with pytest.raises(ValueError, match="at least one system or user"):
        render_messages([])


def test_base_decoder_baseline(service):
    base = SemiDynamicLLM(service, max_new_tokens=MAX_NEW, adapter=False)
    text = service.qa_template(CORPUS[1], QUESTION)
    want = service.compressor.complete([LatentPrompt(text)], adapter=False, max_new_tokens=MAX_NEW)
    assert base.complete(text, formatted=True).text == want[0]
    with pytest.raises(LatentDeliveryError, match="cannot read latent markers"):
        base.complete(service.qa_template(service.compress(CORPUS[:1])[0].marker, QUESTION))
    streamed = [r.delta for r in base.stream_complete(text, formatted=True)]
    assert "".join(streamed) == want[0]
    tuned = service.compressor.complete([LatentPrompt(text)], max_new_tokens=MAX_NEW)[0]
    assert want[0] != tuned  # the baseline really runs without the (randomized) adapter


async def test_async_complete_stream_and_chat(llm, sampler, service, make_prompt):
    want = llm.complete(make_prompt(), formatted=True).text
    assert (await llm.acomplete(make_prompt(), formatted=True)).text == want
    sampled = sampler.complete(make_prompt(), formatted=True).text
    pieces = [p async for p in await sampler.astream_complete(make_prompt(), formatted=True)]
    assert len(pieces) > 1 and pieces[-1].text == sampled

    def message() -> ChatMessage:
        return ChatMessage(role=MessageRole.USER, content=make_prompt())

    assert (await llm.achat([message()])).message.content == want
    chat_pieces = [p async for p in await llm.astream_chat([message()])]
    assert chat_pieces[-1].message.content == want
    ghost = service.qa_template(marker("f" * 64), QUESTION)
    with pytest.raises(UnknownMarkerError):
        await llm.acomplete(ghost, formatted=True)
    with pytest.raises(UnknownMarkerError):
        [p async for p in await llm.astream_complete(ghost, formatted=True)]


async def test_async_stream_stopped_early_stops_the_decoder(service, prompt):
    pieces = service.astream(prompt, max_new_tokens=400, min_new_tokens=400)
    await anext(pieces)
    await pieces.aclose()  # returns once the worker thread and its decoder have ended
    lock = service.compressor.lock
    assert lock.acquire(blocking=False)  # the decoder lock is free again: generation stopped
    lock.release()


# ------------------------------------------------------- generation arguments by their names


def _no_eos(service) -> dict:
    """Random weights may stop at once; forbid ``<eos>`` so the limit is what ends generation."""
    return {"suppress_tokens": [service.compressor.decoder_tokenizer.eos_token_id]}


def _answer_tokens(service, text: str) -> int:
    return len(service.compressor.decoder_tokenizer(text, add_special_tokens=False)["input_ids"])


def test_max_tokens_is_llama_index_name_for_the_limit(service):
    llm = SemiDynamicLLM(service, max_new_tokens=9, generate_kwargs=_no_eos(service))
    assert _answer_tokens(service, llm.complete("Name a city.", max_tokens=2).text) <= 2
    assert _answer_tokens(service, llm.complete("Name a city.", max_tokens=None).text) > 2
    built = SemiDynamicLLM(service, max_tokens=2, generate_kwargs=_no_eos(service))
    assert built.max_new_tokens == built.metadata.num_output == 2
    assert _answer_tokens(service, built.complete("Name a city.").text) <= 2
    with pytest.raises(ValueError, match="not both"):
        llm.complete("Name a city.", max_tokens=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="at least 1"):
        llm.complete("Name a city.", max_tokens=0)


def test_temperature_is_honoured_and_checked(service):
    hot = SemiDynamicLLM(
        service, max_new_tokens=8, temperature=5.0, generate_kwargs=_no_eos(service)
    )
    assert hot.temperature == 5.0
    torch.manual_seed(0)
    assert len({hot.complete("Name a city.").text for _ in range(4)}) > 1  # it samples
    greedy = SemiDynamicLLM(service, max_new_tokens=8, generate_kwargs=_no_eos(service))
    assert len({greedy.complete("Name a city.").text for _ in range(3)}) == 1
    torch.manual_seed(0)
    assert len({greedy.complete("Name a city.", temperature=5.0).text for _ in range(4)}) > 1
    with pytest.raises(ValueError, match="temperature"):
        greedy.complete("Name a city.", temperature=-1)
    with pytest.raises(ValueError):
        SemiDynamicLLM(service, temperature=-1)


def test_unknown_constructor_parameters_are_refused(service):
    with pytest.raises(ValueError, match=r"no parameter top_p.*generate_kwargs"):
        SemiDynamicLLM(service, top_p=0.5)
    with pytest.raises(ValueError, match="no parameter max_token"):
        SemiDynamicLLM(service, max_token=3)  # a typo is not silently ignored
