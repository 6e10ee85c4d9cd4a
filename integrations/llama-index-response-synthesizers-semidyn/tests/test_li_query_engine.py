"""End to end: FAISS VectorStoreIndex → retriever → postprocessor → latent store → LLM."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import (
    KEY,
    RATIO,
    SOURCE,
    SemiDynamicNodePostprocessor,
)
from semidyn_rag.service import LatentService, ResolvedPrompt
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import EncodeCounter

from llama_index.response_synthesizers.semidyn import as_semidyn_query_engine, qa_prompt

MAX_NEW = 6
QUESTION = "Which river flows through Germany to the North Sea?"
RHINE = "node4"


class PromptRecorder:
    """Wraps a service's real ``prepare``: keeps the prompt strings the LLM received and what
    they resolved to (their slots are used by the call, so they cannot be re-read after it)."""

    def __init__(self, service: LatentService) -> None:
        self.prompts: list[str] = []
        self.resolved: list[ResolvedPrompt] = []
        self._prepare = service.prepare
        service.prepare = self.prepare  # type: ignore[method-assign]

    def prepare(self, prompt: str, **kwargs: object) -> ResolvedPrompt:
        self.prompts.append(prompt)
        self.resolved.append(self._prepare(prompt, **kwargs))
        return self.resolved[-1]


@pytest.fixture
def recorder(service: LatentService) -> PromptRecorder:
    return PromptRecorder(service)


@pytest.fixture
def make_engine(index) -> Callable[..., RetrieverQueryEngine]:
    """The stock LlamaIndex wiring a user would write (simple_summarize, training prompt)."""

    def make(service: LatentService, **kwargs: object) -> RetrieverQueryEngine:
        return index.as_query_engine(
            llm=SemiDynamicLLM(service, max_new_tokens=MAX_NEW),
            node_postprocessors=[SemiDynamicNodePostprocessor(service)],
            text_qa_template=qa_prompt(service),
            response_mode="simple_summarize",
            similarity_top_k=2,
            **kwargs,
        )

    return make


def test_query_engine_end_to_end(make_engine, service, recorder, encode_counter):
    response = make_engine(service).query(QUESTION)
    assert isinstance(response, Response)
    nodes = response.source_nodes
    assert nodes[0].node.node_id == RHINE  # FAISS retrieval is real
    assert encode_counter.calls == 1  # both retrieved nodes, one encoder pass
    for node in nodes:
        meta = node.node.metadata
        assert meta[SOURCE] == "encoder" and meta[RATIO] in service.compressor.config.ratios
        assert meta["file_name"].endswith(".txt")  # the user's metadata survives
        assert response.metadata[node.node.node_id][RATIO] == meta[RATIO]
    # the LLM got markers and no chunk text; the answer is the decoder's on those latents
    (prompt,) = recorder.prompts
    (resolved,) = recorder.resolved
    assert list(resolved.keys) == [n.node.metadata[KEY] for n in nodes]
    assert "Rhine" not in prompt and "file_name" not in prompt
    assert service.slots(prompt) == []  # the call used its slots: its markers are text now
    want = service.complete(resolved.prompt, max_new_tokens=MAX_NEW) or "Empty Response"
    assert response.response == want


def test_second_process_answers_from_the_store(make_engine, service, store_path, load_compressor):
    first = make_engine(service).query(QUESTION)

    model = load_compressor()
    counter = EncodeCounter(model)
    with LatentStore(store_path, model.fingerprint) as store:
        fresh = LatentService(model, store)
        again = make_engine(fresh).query(QUESTION)
    assert counter.calls == 0  # the encoder never ran in the new process
    assert [n.node.metadata[SOURCE] for n in again.source_nodes] == ["store", "store"]
    assert [n.node.metadata[KEY] for n in again.source_nodes] == [
        n.node.metadata[KEY] for n in first.source_nodes
    ]


async def test_async_query(make_engine, service, encode_counter):
    sync = make_engine(service).query(QUESTION)
    response = await make_engine(service).aquery(QUESTION)
    assert encode_counter.calls == 1  # the async query read the service's memory
    assert [n.node.metadata[SOURCE] for n in response.source_nodes] == ["memory", "memory"]
    assert response.response == sync.response


def test_streaming_query(make_engine, service):
    response = make_engine(service, streaming=True).query(QUESTION)
    assert isinstance(response, StreamingResponse)
    text = "".join(response.response_gen)
    assert (text or "Empty Response") == make_engine(service).query(QUESTION).response


def test_semidyn_engine_sends_the_training_layout(index, service, recorder):
    engine = as_semidyn_query_engine(
        index, service, llm=SemiDynamicLLM(service, max_new_tokens=MAX_NEW)
    )
    response = engine.query(QUESTION)
    markers = "\n".join(n.node.get_content() for n in response.source_nodes)
    # exactly the decoder's training prompt: one latent per line, no list brackets or quotes
    assert recorder.prompts == [service.qa_template(markers, QUESTION)]


async def test_semidyn_engine_async_and_streaming(index, service):
    llm = SemiDynamicLLM(service, max_new_tokens=MAX_NEW)
    engine = as_semidyn_query_engine(index, service, llm=llm)
    want = engine.query(QUESTION).response
    assert (await engine.aquery(QUESTION)).response == want
    streaming = as_semidyn_query_engine(index, service, llm=llm, streaming=True)
    text = "".join(streaming.query(QUESTION).response_gen)
    assert (text or "Empty Response") == want
    response = await streaming.aquery(QUESTION)
    pieces = [piece async for piece in response.async_response_gen()]
    assert ("".join(pieces) or "Empty Response") == want
