"""End to end: FAISS retriever | compressor | training prompt | model, sync and async.

The last test is the offline-precompression story: one session compresses the corpus into the
shared store (what the LlamaIndex integration reads too); a new session with freshly loaded weights
answers from that store without a single encoder pass.
"""

from __future__ import annotations

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_community.vectorstores import FAISS
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnablePassthrough
from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore

from langchain_semidyn import (
    ChatSemiDynamic,
    SemiDynamicDocumentCompressor,
    SemiDynamicLLM,
    create_semidyn_rag_chain,
    format_docs,
    qa_prompt,
)

QUESTION = "What is the capital of France?"


@pytest.fixture
def vectorstore(documents, embeddings) -> FAISS:
    return FAISS.from_documents(documents, embeddings)


def test_contextual_compression_retriever_chain(service, vectorstore, encode_counter) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service)
    retriever = ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=vectorstore.as_retriever(search_kwargs={"k": 2})
    )
    llm = SemiDynamicLLM(service=service, max_new_tokens=8)
    chain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | qa_prompt(service)
        | llm
        | StrOutputParser()
    )
    answer = chain.invoke(QUESTION)

    docs = retriever.invoke(QUESTION)
    assert docs[0].metadata["semidyn_original_text"].startswith("Paris is the capital")
    assert [d.metadata["semidyn_source"] for d in docs] == ["memory", "memory"]
    assert encode_counter.calls == 1  # the first retrieval compressed both hits in one pass
    prompt = qa_prompt(service).format(context=format_docs(docs), question=QUESTION)
    assert answer == llm.invoke(prompt)


@pytest.mark.asyncio
async def test_lcel_chain_sync_and_async(service, vectorstore, encode_counter) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service)
    chat = ChatSemiDynamic(service=service, max_new_tokens=8)
    chain = create_semidyn_rag_chain(
        vectorstore.as_retriever(search_kwargs={"k": 3}), compressor, chat
    )
    result = await chain.ainvoke(QUESTION)
    assert encode_counter.calls == 1
    assert set(result) == {"question", "documents", "context", "answer"}
    assert len(result["documents"]) == 3
    assert result["context"] == format_docs(result["documents"])
    # the chain's call used its markers (a slot serves one call): the same chunks, fresh markers
    fresh = compressor.compress_documents(
        [Document(page_content=d.metadata["semidyn_original_text"]) for d in result["documents"]],
        QUESTION,
    )
    prompt = qa_prompt(service).format(context=format_docs(fresh), question=QUESTION)
    assert result["answer"] == chat.invoke(prompt).content
    used = qa_prompt(service).format(**result)
    assert chat.invoke(used).response_metadata["latent_keys"] == []  # text now

    again = chain.invoke(QUESTION)
    assert encode_counter.calls == 1
    assert again["answer"] == result["answer"]
    assert {d.metadata["semidyn_source"] for d in again["documents"]} == {"memory"}


@pytest.mark.asyncio
async def test_precompressed_store_serves_a_new_session(
    tmp_path, load_compressor, count_encodes, documents, embeddings
) -> None:
    path = tmp_path / "shared_store"
    texts = [d.page_content for d in documents]

    # Session 1 (offline): compress the whole corpus into the store, as a precompression job would.
    first = load_compressor()
    with LatentStore(path, first.fingerprint) as store:
        offline = LatentService(first, store)
        assert [c.source for c in offline.compress(texts)] == ["encoder"] * len(texts)
        markers = {t: c.marker for t, c in zip(texts, offline.compress(texts), strict=True)}
        reference = offline.complete(
            qa_prompt(offline).format(context=markers[texts[0]], question=QUESTION),
            max_new_tokens=8,
        )

    # Session 2: new weights object from disk, a read-only store, a LangChain FAISS retriever.
    second = load_compressor()
    counter = count_encodes(second)
    with LatentStore(path, second.fingerprint, readonly=True) as store:
        service = LatentService(second, store)
        compressor = SemiDynamicDocumentCompressor(service=service)
        llm = SemiDynamicLLM(service=service, max_new_tokens=8)
        retriever = FAISS.from_documents(documents, embeddings).as_retriever(search_kwargs={"k": 1})
        chain = create_semidyn_rag_chain(retriever, compressor, llm)

        result = chain.invoke(QUESTION)
        (doc,) = result["documents"]
        assert doc.metadata["semidyn_source"] == "store"
        assert doc.metadata["semidyn_key"] == service.keys(texts[:1])[0]  # the stored entry
        assert result["answer"] == reference

        fresh = LatentService(second, store)  # no memory: the async path reads the store too
        async_chain = create_semidyn_rag_chain(
            retriever,
            SemiDynamicDocumentCompressor(service=fresh),
            SemiDynamicLLM(service=fresh, max_new_tokens=8),
        )
        async_result = await async_chain.ainvoke(QUESTION)
        assert async_result["documents"][0].metadata["semidyn_source"] == "store"
        assert async_result["answer"] == reference

    assert counter.calls == 0  # the encoder never ran in session 2
