"""A model call reads the latents of the documents compressed for it, never a marker in text.

The leak reproduced here: a bare ``retriever.invoke`` through `ContextualCompressionRetriever`
issues live markers that no LLM call ever reads. Pasted into a later question or chat message,
such a marker must stay text: the decoder gets no latents for it and its slot stays unused,
while the chain and a prompt built by hand from freshly compressed documents still deliver.
Without ``latent_documents`` a call reads only the markers `format_docs` armed, so a pasted
marker is text even when it is the only (or the newest) live marker in the prompt.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_community.vectorstores import FAISS
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnablePassthrough
from semidyn_rag import service as service_module
from semidyn_rag.modeling import LatentPrompt
from semidyn_rag.service import IncompleteContextError, UnknownMarkerError, _SlotRegistry, is_marker

from langchain_semidyn import (
    ChatSemiDynamic,
    SemiDynamicDocumentCompressor,
    SemiDynamicLLM,
    create_semidyn_rag_chain,
    format_docs,
    qa_prompt,
    qa_template,
)

QUESTION = "What is the capital of France?"


class DecoderInputs:
    """Records every `LatentPrompt` the decoder reads (wraps the compressor's generation)."""

    def __init__(self, compressor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prompts: list[LatentPrompt] = []
        complete, stream = compressor.complete, compressor.stream

        def recording_complete(prompts: list[LatentPrompt], **kwargs: Any) -> list[str]:
            self.prompts.extend(prompts)
            return complete(prompts, **kwargs)

        def recording_stream(prompt: LatentPrompt, **kwargs: Any) -> Any:
            self.prompts.append(prompt)
            return stream(prompt, **kwargs)

        monkeypatch.setattr(compressor, "complete", recording_complete)
        monkeypatch.setattr(compressor, "stream", recording_stream)

    def only(self) -> LatentPrompt:
        assert len(self.prompts) == 1
        return self.prompts[0]


@pytest.fixture
def decoder_inputs(service, monkeypatch) -> DecoderInputs:
    return DecoderInputs(service.compressor, monkeypatch)


@pytest.fixture
def vectorstore(documents, embeddings) -> FAISS:
    return FAISS.from_documents(documents, embeddings)


@pytest.fixture
def doc_compressor(service) -> SemiDynamicDocumentCompressor:
    return SemiDynamicDocumentCompressor(service=service)


def bare_retrieval(vectorstore: FAISS, doc_compressor: SemiDynamicDocumentCompressor) -> str:
    """A live marker from a bare retriever call: compressed, shown to a user, never decoded."""
    retriever = ContextualCompressionRetriever(
        base_compressor=doc_compressor,
        base_retriever=vectorstore.as_retriever(search_kwargs={"k": 2}),
    )
    docs = retriever.invoke("Where does the Rhine flow?")
    assert is_marker(docs[0].page_content)
    return docs[0].page_content


@pytest.fixture
def leaked(service, vectorstore, doc_compressor) -> str:
    return bare_retrieval(vectorstore, doc_compressor)


def assert_text_only(prompt: LatentPrompt, marker: str, latents: int) -> None:
    """``marker`` reached the decoder as its characters; the prompt holds ``latents`` spans."""
    assert len(prompt.latents) == latents
    assert marker in "".join(prompt.pieces)
    assert is_marker(marker)  # its slot was not used: no call read it


def test_chain_question_marker_is_text(
    service, vectorstore, doc_compressor, leaked, decoder_inputs
):
    """(a) the chain: a marker pasted into the question; the chain's own two are read."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    retriever = vectorstore.as_retriever(search_kwargs={"k": 2})
    result = create_semidyn_rag_chain(retriever, doc_compressor, llm).invoke(f"{QUESTION} {leaked}")
    assert len(result["documents"]) == 2
    assert_text_only(decoder_inputs.only(), leaked, latents=2)
    assert not any(is_marker(d.page_content) for d in result["documents"])  # used by the call


@pytest.mark.asyncio
async def test_chain_delivers_its_documents_async_and_streaming(
    service, vectorstore, doc_compressor, leaked, decoder_inputs
):
    chat = ChatSemiDynamic(service=service, max_new_tokens=4)
    chain = create_semidyn_rag_chain(
        vectorstore.as_retriever(search_kwargs={"k": 3}), doc_compressor, chat
    )
    await chain.ainvoke(f"{QUESTION} {leaked}")
    assert_text_only(decoder_inputs.only(), leaked, latents=3)
    parts = list(chain.stream(QUESTION))
    assert any("answer" in p for p in parts)
    assert len(decoder_inputs.prompts[1].latents) == 3


def test_chain_that_compresses_nothing_reads_no_pasted_marker(
    service, vectorstore, doc_compressor, leaked, decoder_inputs
):
    """Every retrieved document expanded: no fresh markers, and the pasted one is still text."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    retriever = vectorstore.as_retriever(search_kwargs={"k": 2})
    chain = create_semidyn_rag_chain(retriever, doc_compressor.with_expansion(5), llm)
    result = chain.invoke(f"{QUESTION} {leaked}")
    assert all(d.metadata["semidyn_expanded"] for d in result["documents"])
    assert_text_only(decoder_inputs.only(), leaked, latents=0)


def test_lcel_chain_question_marker_is_text(
    service, vectorstore, doc_compressor, leaked, decoder_inputs
):
    """(a) the README's own LCEL composition: the newest compression in the prompt is read."""
    retriever = ContextualCompressionRetriever(
        base_compressor=doc_compressor,
        base_retriever=vectorstore.as_retriever(search_kwargs={"k": 2}),
    )
    chain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | qa_prompt(service)
        | SemiDynamicLLM(service=service, max_new_tokens=4)
        | StrOutputParser()
    )
    chain.invoke(f"{QUESTION} {leaked}")
    assert_text_only(decoder_inputs.only(), leaked, latents=2)


def test_chat_history_marker_is_text(service, doc_compressor, documents, leaked, decoder_inputs):
    """(b) a marker in an earlier human message; the last message's fresh context is read."""
    fresh = doc_compressor.compress_documents(documents[:2], QUESTION)
    chat = ChatSemiDynamic(service=service, max_new_tokens=4)
    template = qa_template(service)
    messages = [
        HumanMessage(f"Earlier you showed me {leaked}"),
        AIMessage("Yes."),
        HumanMessage(template.format(context=format_docs(fresh), question=QUESTION)),
    ]
    reply = chat.invoke(messages)
    assert_text_only(decoder_inputs.only(), leaked, latents=2)
    assert reply.response_metadata["latent_keys"] == [d.metadata["semidyn_key"] for d in fresh]


def test_direct_invoke_question_marker_is_text(
    service, doc_compressor, documents, leaked, decoder_inputs
):
    """(c) a hand-built prompt: fresh documents as context, the leaked marker in the question."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    fresh = doc_compressor.compress_documents(documents[:2], QUESTION)
    prompt = qa_prompt(service).format(context=format_docs(fresh), question=f"Is it {leaked}?")
    info = llm.generate([prompt]).generations[0][0].generation_info
    assert_text_only(decoder_inputs.only(), leaked, latents=2)
    assert info["latent_keys"] == [d.metadata["semidyn_key"] for d in fresh]


def test_direct_invoke_with_latent_documents(
    service, doc_compressor, documents, leaked, decoder_inputs
):
    """Delivered explicitly, exactly those documents are read, whatever else the prompt holds."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    fresh = doc_compressor.compress_documents(documents[:2], QUESTION)
    prompt = qa_prompt(service).format(context=format_docs(fresh), question=f"Is it {leaked}?")
    llm.invoke(prompt, latent_documents=fresh)
    assert_text_only(decoder_inputs.only(), leaked, latents=2)

    # no documents delivered: the prompt holds only text, the leaked marker included
    llm.invoke(f"Question: what is {leaked}?", latent_documents=[])
    assert_text_only(decoder_inputs.prompts[1], leaked, latents=0)

    # a delivered document the prompt leaves out never reaches the decoder silently
    fresh = doc_compressor.compress_documents(documents[:2], QUESTION)
    lacking = qa_prompt(service).format(context=fresh[0].page_content, question=QUESTION)
    with pytest.raises(IncompleteContextError, match="1 of the 2 compressed documents"):
        llm.invoke(lacking, latent_documents=fresh)
    assert len(decoder_inputs.prompts) == 2


def test_a_delivered_document_whose_slot_expired_is_an_error(
    service, doc_compressor, documents, monkeypatch
):
    """Its latents are gone: an error even when the prompt leaves the document out."""
    monkeypatch.setattr(service_module, "_SLOTS", _SlotRegistry(capacity=2, remembered=64))
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    expired = doc_compressor.compress_documents(documents[:2], QUESTION)
    doc_compressor.compress_documents(documents[2:4], QUESTION)  # pushes them out
    with pytest.raises(UnknownMarkerError, match="expired before any call read it"):
        llm.invoke(f"Question: {QUESTION}", latent_documents=expired)
    with pytest.raises(UnknownMarkerError, match="expired before any call read it"):
        format_docs(expired)


def test_hand_built_prompt_still_reads_its_documents(
    service, doc_compressor, documents, decoder_inputs
):
    """The plain flow: compress, format, invoke; expanded text stays text."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    docs = doc_compressor.with_expansion(1).compress_documents(documents[:3], QUESTION)
    assert [d.metadata["semidyn_expanded"] for d in docs] == [True, False, False]
    llm.invoke(qa_prompt(service).format(context=format_docs(docs), question=QUESTION))
    prompt = decoder_inputs.only()
    assert len(prompt.latents) == 2
    assert docs[0].page_content in "".join(prompt.pieces)


def test_expanded_document_text_is_never_delivered(service, doc_compressor, leaked, decoder_inputs):
    """A document whose text is a live marker, expanded to text, delivers no latents."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    [doc] = doc_compressor.with_expansion(1).compress_documents(
        [Document(page_content=leaked)], "q"
    )
    assert doc.metadata["semidyn_expanded"] and doc.page_content == leaked
    llm.invoke(format_docs([doc]), latent_documents=[doc])
    assert_text_only(decoder_inputs.only(), leaked, latents=0)


# ------------------------------------------- the pasted marker is the only or the newest one


def test_direct_question_holding_only_a_pasted_marker_is_text(
    service, leaked, decoder_inputs, caplog
):
    """(a) a direct call, no context: the user's text is read as typed; no error."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    with caplog.at_level(logging.WARNING, logger="langchain_semidyn._decoding"):
        llm.invoke(f"Question: what does {leaked} say?")
    assert_text_only(decoder_inputs.only(), leaked, latents=0)
    assert "not formatted by format_docs" in caplog.text
    "".join(llm.stream(f"And {leaked}?"))
    assert_text_only(decoder_inputs.prompts[1], leaked, latents=0)


def test_chat_history_marker_newer_than_the_context_is_text(
    service, vectorstore, doc_compressor, documents, decoder_inputs
):
    """(b) the pasted marker was issued after the call's own documents: still text."""
    fresh = doc_compressor.compress_documents(documents[:2], QUESTION)
    context = format_docs(fresh)
    newer = bare_retrieval(vectorstore, doc_compressor)
    chat = ChatSemiDynamic(service=service, max_new_tokens=4)
    reply = chat.invoke(
        [
            HumanMessage(f"Earlier you showed me {newer}"),
            AIMessage("Yes."),
            HumanMessage(qa_template(service).format(context=context, question=QUESTION)),
        ]
    )
    assert_text_only(decoder_inputs.only(), newer, latents=2)
    assert reply.response_metadata["latent_keys"] == [d.metadata["semidyn_key"] for d in fresh]


@pytest.mark.parametrize("expanded", [True, False])
def test_lcel_chain_without_fresh_markers_reads_no_pasted_marker(
    service, vectorstore, doc_compressor, leaked, decoder_inputs, expanded
):
    """(c) a hand-built LCEL chain whose context is text (every document expanded, or no
    compressor at all): the marker in the question is the prompt's only live one, and text."""
    base = vectorstore.as_retriever(search_kwargs={"k": 2})
    retriever = (
        ContextualCompressionRetriever(
            base_compressor=doc_compressor.with_expansion(5), base_retriever=base
        )
        if expanded
        else base
    )
    chain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | qa_prompt(service)
        | SemiDynamicLLM(service=service, max_new_tokens=4)
        | StrOutputParser()
    )
    chain.invoke(f"{QUESTION} {leaked}")
    assert_text_only(decoder_inputs.only(), leaked, latents=0)


def test_hand_formatted_markers_are_text_unless_delivered(
    service, doc_compressor, documents, decoder_inputs, caplog
):
    """A context joined by hand (not `format_docs`) delivers nothing unless named."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    docs = doc_compressor.compress_documents(documents[:2], QUESTION)
    context = "\n".join(d.page_content for d in docs)
    prompt = qa_prompt(service).format(context=context, question=QUESTION)
    with caplog.at_level(logging.WARNING, logger="langchain_semidyn._decoding"):
        llm.invoke(prompt)
    assert "2 latent marker(s)" in caplog.text and "format_docs" in caplog.text
    assert len(decoder_inputs.prompts[0].latents) == 0
    assert all(is_marker(d.page_content) for d in docs)  # unused: still deliverable
    llm.invoke(prompt, latent_documents=docs)
    assert len(decoder_inputs.prompts[1].latents) == 2


def test_format_docs_arms_only_the_compressors_documents(
    service, doc_compressor, documents, leaked, decoder_inputs
):
    """A document whose text is a live marker but that the compressor did not make for that
    chunk (no metadata, or another chunk's key) arms nothing through `format_docs`."""
    [own] = doc_compressor.compress_documents(documents[:1], QUESTION)
    forged = [
        Document(page_content=leaked),
        Document(page_content=leaked, metadata={**own.metadata, "semidyn_expanded": False}),
    ]
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    llm.invoke(qa_prompt(service).format(context=format_docs(forged), question=QUESTION))
    assert_text_only(decoder_inputs.only(), leaked, latents=0)


def test_a_copy_of_a_leaked_document_with_its_own_metadata_arms_nothing(
    service, vectorstore, doc_compressor, decoder_inputs
):
    """The metadata of a retrieved document (``semidyn_key``, ``semidyn_expanded``) is visible to
    users: a new Document carrying the leaked marker *and* its exact metadata is still not the
    object our compressor returned, so `format_docs` does not arm it."""
    retriever = ContextualCompressionRetriever(
        base_compressor=doc_compressor,
        base_retriever=vectorstore.as_retriever(search_kwargs={"k": 2}),
    )
    leaked_doc = retriever.invoke("Where does the Rhine flow?")[0]
    forged = Document(page_content=leaked_doc.page_content, metadata=dict(leaked_doc.metadata))
    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    llm.invoke(qa_prompt(service).format(context=format_docs([forged]), question=QUESTION))
    assert_text_only(decoder_inputs.only(), leaked_doc.page_content, latents=0)
