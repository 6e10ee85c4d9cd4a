"""Every stock response mode delivers every retrieved chunk's latents, or the query raises.

LlamaIndex's synthesizers pack prompt text by their own token counts and may re-split, spread over
several calls, or truncate the context; Refine even swallows ``ValueError``. Each query below
retrieves all five chunks (top-k 5) and records the latents that really reached the decoder. The
outcome must be one of two: the query raised a `LatentDeliveryError`, or every chunk's latents
were in the decoder's input. Never an answer from fewer chunks than ``source_nodes`` lists.
"""

from __future__ import annotations

import re

import pytest
import torch
from llama_index.core.response_synthesizers import ResponseMode
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import (
    KEY,
    SemiDynamicNodePostprocessor,
)
from semidyn_rag.modeling import LatentPrompt
from semidyn_rag.service import IncompleteContextError, LatentDeliveryError, LatentService
from semidyn_rag.testing import PASSAGES as CORPUS

from llama_index.response_synthesizers.semidyn import as_semidyn_query_engine, qa_prompt

QUESTION = "Which river flows through Germany to the North Sea?"
MODES = [
    ResponseMode.COMPACT,
    ResponseMode.REFINE,
    ResponseMode.SIMPLE_SUMMARIZE,
    ResponseMode.TREE_SUMMARIZE,
    ResponseMode.ACCUMULATE,
    ResponseMode.COMPACT_ACCUMULATE,
]
SPLITTING = {ResponseMode.REFINE, ResponseMode.ACCUMULATE}
"""Modes that give each chunk its own LLM call whatever the window."""


class DecoderInputs:
    """Wraps the compressor's real ``complete``/``stream``: keeps every prompt the decoder read."""

    def __init__(self, service: LatentService) -> None:
        self.prompts: list[LatentPrompt] = []
        model = service.compressor
        self._complete, self._stream = model.complete, model.stream
        model.complete = self.complete  # type: ignore[method-assign]
        model.stream = self.stream  # type: ignore[method-assign]
        self._model = model

    def complete(self, prompts, **kwargs):
        self.prompts += list(prompts)
        return self._complete(prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        self.prompts.append(prompt)
        return self._stream(prompt, **kwargs)

    def restore(self) -> None:
        del self._model.complete, self._model.stream

    def delivered(self, service: LatentService, keys: list[str]) -> set[str]:
        """The keys whose latents appear, as a whole span, in some decoder prompt."""
        spans = [lat for p in self.prompts for lat in p.latents]
        found = service.lookup(keys)
        return {k for k in keys if any(torch.equal(found[k].latents.to(s.dtype), s) for s in spans)}


@pytest.fixture
def decoder_inputs(service):
    recorder = DecoderInputs(service)
    yield recorder
    recorder.restore()


def _stock_engine(index, service, llm, mode):
    """What a user writes with stock LlamaIndex: no prompt helper of ours."""
    return index.as_query_engine(
        llm=llm,
        node_postprocessors=[SemiDynamicNodePostprocessor(service)],
        text_qa_template=qa_prompt(service),
        response_mode=mode,
        similarity_top_k=5,
    )


def _semidyn_engine(index, service, llm, mode):
    return as_semidyn_query_engine(index, service, llm=llm, response_mode=mode, similarity_top_k=5)


def _query(engine, streaming: bool):
    response = engine.query(QUESTION)
    if streaming:
        "".join(response.response_gen)
    return response


@pytest.mark.parametrize("wiring", [_stock_engine, _semidyn_engine], ids=["stock", "semidyn"])
@pytest.mark.parametrize("window", [4096, 600, 90])
@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
def test_every_chunk_reaches_the_decoder_or_the_query_fails(
    index, service, decoder_inputs, mode, window, wiring
):
    llm = SemiDynamicLLM(service, max_new_tokens=6, context_window=window)
    engine = wiring(index, service, llm, mode)
    try:
        response = _query(engine, streaming=False)
    except LatentDeliveryError as error:
        assert not isinstance(error, (ValueError, TypeError))  # Refine swallows those
        assert mode in SPLITTING or window < 4096 or wiring is _stock_engine, error
        return
    except ValueError as error:  # LlamaIndex's own refusal: its template leaves no room
        assert window < 4096 and re.search(r"(Chunk|context) size -?\d+", str(error)), error
        return
    keys = [n.node.metadata[KEY] for n in response.source_nodes]
    assert len(keys) == len(CORPUS) == 5
    assert decoder_inputs.delivered(service, keys) == set(keys)
    assert mode not in SPLITTING  # one chunk per call cannot hold the query's five


@pytest.mark.parametrize("mode", [ResponseMode.COMPACT, ResponseMode.TREE_SUMMARIZE])
def test_packing_modes_answer_from_all_chunks_with_our_prompt_helper(
    index, service, decoder_inputs, mode
):
    """With the LLM's prompt helper (markers cost their latents), one call reads all five.

    (The tiny test tokenizer spends many tokens on LlamaIndex's refine template, hence 2048.)
    """
    llm = SemiDynamicLLM(service, max_new_tokens=6, context_window=2048)
    response = _semidyn_engine(index, service, llm, mode).query(QUESTION)
    keys = [n.node.metadata[KEY] for n in response.source_nodes]
    assert len(decoder_inputs.prompts) == 1
    assert decoder_inputs.delivered(service, keys) == set(keys) and len(keys) == 5


@pytest.mark.parametrize("mode", [ResponseMode.REFINE, ResponseMode.ACCUMULATE])
def test_one_chunk_per_call_modes_fail_loudly(index, service, decoder_inputs, mode):
    """The first call's prompt holds the first chunk, or a piece of its marker where the mode's
    text count cut it (random slot ids tokenize to varying lengths): either way the verdict is
    the query's missing chunks, checked before cut pieces."""
    llm = SemiDynamicLLM(service, max_new_tokens=6, context_window=600)
    with pytest.raises(IncompleteContextError, match=r"holds [01] of the 5 chunks"):
        _stock_engine(index, service, llm, mode).query(QUESTION)
    assert decoder_inputs.prompts == []  # refused before any decoding


def test_simple_summarize_truncation_is_an_error(index, service, decoder_inputs):
    """The stock truncation keeps as many markers as its text count allows: never silently."""
    llm = SemiDynamicLLM(service, max_new_tokens=6, context_window=90)
    with pytest.raises(IncompleteContextError, match="of the 5 chunks"):
        _stock_engine(index, service, llm, ResponseMode.SIMPLE_SUMMARIZE).query(QUESTION)
    assert decoder_inputs.prompts == []


def test_streaming_refine_raises_too(index, service):
    llm = SemiDynamicLLM(service, max_new_tokens=6)
    engine = index.as_query_engine(
        llm=llm,
        node_postprocessors=[SemiDynamicNodePostprocessor(service)],
        response_mode=ResponseMode.REFINE,
        similarity_top_k=5,
        streaming=True,
    )
    with pytest.raises(IncompleteContextError):
        _query(engine, streaming=True)


def test_prompt_beyond_the_window_is_an_error(index, service):
    """The default synthesizer never truncates; a prompt the decoder cannot hold is refused."""
    llm = SemiDynamicLLM(service, max_new_tokens=6, context_window=40)
    engine = as_semidyn_query_engine(index, service, llm=llm, similarity_top_k=5)
    with pytest.raises(LatentDeliveryError, match="context window of 40"):
        engine.query(QUESTION)


def test_count_tokens_counts_markers_as_their_latents(service):
    llm = SemiDynamicLLM(service)
    chunks = service.compress(CORPUS[:2])
    text = "Context: " + "\n".join(c.marker for c in chunks)
    plain = len(llm.count_tokens("Context: \n"))
    assert len(llm.count_tokens(text)) == plain + sum(c.context.num_latents for c in chunks)
    helper = llm.prompt_helper()
    assert helper.context_window == llm.context_window and helper.num_output == llm.max_new_tokens


def test_modes_that_read_no_context_are_refused_by_the_engine_builder(index, service):
    for mode in (ResponseMode.GENERATION, ResponseMode.NO_TEXT, ResponseMode.CONTEXT_ONLY):
        with pytest.raises(ValueError, match="does not read the retrieved chunks"):
            as_semidyn_query_engine(index, service, response_mode=mode)
