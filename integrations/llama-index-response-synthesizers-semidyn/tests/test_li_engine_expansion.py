"""Selective expansion through the engine and the LLM: the decoder reads one mixed prompt."""

from __future__ import annotations

import pytest
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import (
    EXPANDED,
    NUM_LATENTS,
    ORIGINAL_TEXT,
    SemiDynamicNodePostprocessor,
)
from semidyn_rag.modeling import LatentPrompt
from semidyn_rag.service import IncompleteContextError, LatentService

from llama_index.response_synthesizers.semidyn import as_semidyn_query_engine

QUESTION = "Which river flows through Germany to the North Sea?"
MAX_NEW = 4
SCORES = [0.2, 0.9, 0.1, 0.7, 0.4]  # not in retrieval order: the top two are nodes 1 and 3


def scored(nodes: list[TextNode]) -> list[NodeWithScore]:
    return [NodeWithScore(node=n, score=s) for n, s in zip(nodes, SCORES, strict=False)]


class DecoderInputs:
    """Wraps the decoder's real ``embed_prompts`` (every generation path embeds through it):
    keeps the prompts the decoder embedded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, service: LatentService) -> None:
        self.prompts: list[LatentPrompt] = []
        decoder = service.compressor.latent_decoder
        real = decoder.embed_prompts

        def embed(prompts, *args, **kwargs):
            self.prompts += list(prompts)
            return real(prompts, *args, **kwargs)

        monkeypatch.setattr(decoder, "embed_prompts", embed)


@pytest.fixture
def decoder_inputs(monkeypatch, service) -> DecoderInputs:
    return DecoderInputs(monkeypatch, service)


def check_decoder_read(prompt: LatentPrompt, response, service) -> None:
    """Text of expanded nodes in the decoder's pieces, in retrieval order; the rest as latents."""
    nodes = response.source_nodes
    latent_nodes = [n for n in nodes if not n.node.metadata[EXPANDED]]
    assert len(prompt.latents) == len(latent_nodes)
    for got, node in zip(prompt.latents, latent_nodes, strict=True):
        assert got.shape[0] == node.node.metadata[NUM_LATENTS]
    joined = "\x00".join(prompt.pieces)
    order = []
    for node in nodes:
        if node.node.metadata[EXPANDED]:
            text = node.node.metadata[ORIGINAL_TEXT]
            assert text in joined
            order.append(joined.index(text))
    assert order == sorted(order)


def test_engine_sends_a_mixed_prompt_to_the_decoder(index, service, decoder_inputs):
    llm = SemiDynamicLLM(service, max_new_tokens=MAX_NEW)
    engine = as_semidyn_query_engine(index, service, llm=llm, similarity_top_k=3, expand_top_k=1)
    response = engine.query(QUESTION)
    nodes = response.source_nodes
    assert [n.node.metadata[EXPANDED] for n in nodes] == [True, False, False]
    assert nodes[0].score >= nodes[1].score  # the best-scored node is the one expanded
    (prompt,) = decoder_inputs.prompts
    check_decoder_read(prompt, response, service)
    assert "Rhine" in prompt.pieces[0]  # FAISS ranks the Rhine chunk first; its text is read


async def test_engine_async_and_streaming_with_expansion(index, service, decoder_inputs):
    llm = SemiDynamicLLM(service, max_new_tokens=MAX_NEW)
    make = lambda **kw: as_semidyn_query_engine(  # noqa: E731
        index, service, llm=llm, similarity_top_k=3, expand_top_k=2, **kw
    )
    want = make().query(QUESTION).response
    response = await make().aquery(QUESTION)
    assert response.response == want
    check_decoder_read(decoder_inputs.prompts[-1], response, service)
    streaming = make(streaming=True).query(QUESTION)
    assert ("".join(streaming.response_gen) or "Empty Response") == want
    check_decoder_read(decoder_inputs.prompts[-1], streaming, service)
    astreaming = await make(streaming=True).aquery(QUESTION)
    pieces = [p async for p in astreaming.async_response_gen()]
    assert ("".join(pieces) or "Empty Response") == want
    check_decoder_read(decoder_inputs.prompts[-1], astreaming, service)
    assert len(decoder_inputs.prompts) == 4


async def test_llm_streams_a_mixed_prompt(service, nodes, decoder_inputs):
    post = SemiDynamicNodePostprocessor(service, expand_top_k=1)

    def prompt() -> str:  # fresh markers per call: a slot serves one LLM call
        out = post.postprocess_nodes(scored(nodes[:3]), query_str="q")
        context = "\n".join(n.node.get_content() for n in out)
        return service.qa_template(context, "Who was born in Lyon?")

    llm = SemiDynamicLLM(service, max_new_tokens=MAX_NEW)
    full = llm.complete(prompt(), formatted=True).text
    assert "".join(r.delta for r in llm.stream_complete(prompt(), formatted=True)) == full
    stream = await llm.astream_complete(prompt(), formatted=True)
    assert "".join([r.delta async for r in stream]) == full
    for seen in decoder_inputs.prompts:
        assert len(seen.latents) == 2 and nodes[1].text in seen.pieces[1]


def test_lost_expanded_text_is_an_error(index, service):
    """refine reads one chunk per call: the expanded chunks would be lost; it fails instead."""
    llm = SemiDynamicLLM(service, max_new_tokens=MAX_NEW)
    engine = as_semidyn_query_engine(
        index, service, llm=llm, similarity_top_k=3, expand_top_k=3, response_mode="refine"
    )
    with pytest.raises(IncompleteContextError, match="expanded to text"):
        engine.query(QUESTION)
