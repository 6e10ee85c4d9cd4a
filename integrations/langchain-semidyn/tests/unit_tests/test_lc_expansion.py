"""Selective expansion in LangChain: the best-scored documents reach the decoder as text."""

from __future__ import annotations

import numpy as np
import pytest
from langchain_community.vectorstores import FAISS
from langchain_core.documents import Document
from langchain_core.prompts import PromptTemplate
from pydantic import ValidationError
from semidyn_rag.modeling import LatentPrompt
from semidyn_rag.service import MARKER_PATTERN, IncompleteContextError, LatentService

from langchain_semidyn import (
    ChatSemiDynamic,
    DensityPolicy,
    SemiDynamicDocumentCompressor,
    SemiDynamicLLM,
    compression_step,
    create_semidyn_rag_chain,
    format_docs,
    qa_prompt,
)

SCORES = [0.2, 0.9, 0.1, 0.7, 0.4]  # the top two are documents 1 and 3
QUESTION = "What is the capital of France?"


def scored(documents: list[Document]) -> list[Document]:
    return [
        Document(
            page_content=d.page_content, metadata={**d.metadata, "relevance_score": s}, id=d.id
        )
        for d, s in zip(documents, SCORES, strict=True)
    ]


def expanded_ids(documents: list[Document]) -> list[str | None]:
    return [d.id for d in documents if d.metadata["semidyn_expanded"]]


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


def test_top_k_expands_the_best_scores_in_place(service, documents, encode_counter) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service, expand_top_k=2)
    before = scored(documents)
    out = compressor.compress_documents(before, QUESTION)
    assert [d.id for d in out] == [d.id for d in before]  # order kept
    assert expanded_ids(out) == ["doc1", "doc3"]
    assert encode_counter.rows == 3  # expanded documents skip the encoder
    for old, new in zip(before, out, strict=True):
        meta = new.metadata
        assert meta["source"] == old.metadata["source"]
        assert meta["relevance_score"] == old.metadata["relevance_score"]
        if meta["semidyn_expanded"]:
            assert new.page_content == old.page_content
            assert "semidyn_key" not in meta and "semidyn_num_latents" not in meta
        else:
            assert MARKER_PATTERN.fullmatch(new.page_content)
            assert meta["semidyn_num_latents"] >= 1


def test_without_scores_retrieval_order_decides(service, documents) -> None:
    out = SemiDynamicDocumentCompressor(service=service, expand_top_k=2).compress_documents(
        documents, "q"
    )
    assert expanded_ids(out) == ["doc0", "doc1"]
    other_key = SemiDynamicDocumentCompressor(
        service=service, expand_top_k=1, score_key="semidyn_nothing"
    )
    assert expanded_ids(other_key.compress_documents(scored(documents), "q")) == ["doc0"]
    bad = [Document(page_content="x y z", metadata={"relevance_score": "high"}), *documents]
    with pytest.raises(ValueError, match="not a number"):
        SemiDynamicDocumentCompressor(service=service, expand_top_k=1).compress_documents(bad, "q")


def test_budget_edges_and_overrides(service, documents, encode_counter) -> None:
    base = SemiDynamicDocumentCompressor(service=service)
    assert expanded_ids(base.compress_documents(scored(documents), "q")) == []  # default: none
    assert expanded_ids(base.compress_documents(scored(documents), "q", expand_top_k=1)) == ["doc1"]
    two = base.with_expansion(2)
    assert two.expand_top_k == 2 and base.expand_top_k == 0
    assert expanded_ids(two.compress_documents(scored(documents), "q")) == ["doc1", "doc3"]
    assert expanded_ids(two.compress_documents(scored(documents), "q", expand_top_k=0)) == []
    calls = encode_counter.calls
    everything = base.compress_documents(scored(documents), "q", expand_top_k=50)
    assert len(expanded_ids(everything)) == len(documents) and encode_counter.calls == calls
    with pytest.raises(ValueError, match=">= 0"):
        base.compress_documents(documents, "q", expand_top_k=-1)
    with pytest.raises(ValidationError):
        SemiDynamicDocumentCompressor(service=service, expand_top_k=-1)
    with pytest.raises(ValidationError):
        base.with_expansion(-3)
    with pytest.raises(ValidationError):
        SemiDynamicDocumentCompressor(service=service, expansion_policy=object())


def test_density_policy(service, documents) -> None:
    compressor = SemiDynamicDocumentCompressor(
        service=service, expand_top_k=1, expansion_policy=DensityPolicy()
    )
    out = compressor.compress_documents(scored(documents), "q")
    ys = [c.predicted_y for c in service.compressor.compress([d.page_content for d in documents])]
    densest = min(range(len(documents)), key=lambda i: (ys[i], -SCORES[i]))
    assert expanded_ids(out) == [f"doc{densest}"]


@pytest.mark.asyncio
async def test_async_and_compression_step(service, documents) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service, expand_top_k=1)
    got = await compressor.acompress_documents(scored(documents), "q", expand_top_k=2)
    assert expanded_ids(got) == ["doc1", "doc3"]
    step = compression_step(compressor)
    sync = step.invoke({"documents": scored(documents), "question": "q"})
    assert expanded_ids(sync) == ["doc1"]
    over = await step.ainvoke({"documents": scored(documents), "question": "q", "expand_top_k": 3})
    assert expanded_ids(over) == ["doc1", "doc3", "doc4"]


def check_decoder_read(prompt: LatentPrompt, documents: list[Document]) -> None:
    """Text of expanded documents in the decoder's pieces, in order; the rest as latents."""
    latent_docs = [d for d in documents if not d.metadata["semidyn_expanded"]]
    assert [t.shape[0] for t in prompt.latents] == [
        d.metadata["semidyn_num_latents"] for d in latent_docs
    ]
    joined = "\x00".join(prompt.pieces)
    where = [joined.index(d.page_content) for d in documents if d.metadata["semidyn_expanded"]]
    assert where and where == sorted(where)


@pytest.mark.asyncio
async def test_llm_and_chat_read_a_mixed_prompt_sync_async_streaming(
    service, documents, decoder_inputs
) -> None:
    compressor = SemiDynamicDocumentCompressor(service=service, expand_top_k=2)
    docs = compressor.compress_documents(scored(documents), "q")

    def prompt() -> str:  # fresh markers per call: a slot carries latents into one call only
        fresh = compressor.compress_documents(scored(documents), "q")
        return qa_prompt(service).format(context=format_docs(fresh), question=QUESTION)

    llm = SemiDynamicLLM(service=service, max_new_tokens=4)
    chat = ChatSemiDynamic(service=service, max_new_tokens=4)
    full = llm.invoke(prompt())
    assert "".join(llm.stream(prompt())) == full
    assert await llm.ainvoke(prompt()) == full
    assert "".join([c async for c in llm.astream(prompt())]) == full
    assert chat.invoke(prompt()).content == full
    assert "".join([c.content async for c in chat.astream(prompt())]) == full
    assert len(decoder_inputs.prompts) == 6
    for seen in decoder_inputs.prompts:
        check_decoder_read(seen, docs)
    # usage counts the expanded text's tokens and the latents, what the decoder really read
    result = llm.generate([prompt()])
    info = result.generations[0][0].generation_info
    assert info["prompt_tokens"] == service.compressor.prompt_positions(decoder_inputs.prompts[0])
    assert info["latent_positions"] == sum(t.shape[0] for t in decoder_inputs.prompts[0].latents)


def test_rag_chain_with_expansion(service, documents, embeddings, decoder_inputs) -> None:
    retriever = FAISS.from_documents(documents, embeddings).as_retriever(search_kwargs={"k": 3})
    chain = create_semidyn_rag_chain(
        retriever,
        SemiDynamicDocumentCompressor(service=service, expand_top_k=1),
        SemiDynamicLLM(service=service, max_new_tokens=4),
    )
    out = chain.invoke(QUESTION)
    docs = out["documents"]
    assert [d.metadata["semidyn_expanded"] for d in docs] == [True, False, False]
    assert docs[0].page_content.startswith("Paris is the capital")  # the best hit, as text
    assert docs[0].page_content in out["context"]
    check_decoder_read(decoder_inputs.prompts[-1], docs)


def test_numpy_scores_rank_like_floats(service, documents) -> None:
    """Rerankers hand back NumPy scores (FlashrankRerank's ``relevance_score`` is a float32)."""
    docs = [
        Document(page_content=d.page_content, metadata={"relevance_score": np.float32(s)}, id=d.id)
        for d, s in zip(documents, SCORES, strict=True)
    ]
    out = SemiDynamicDocumentCompressor(service=service, expand_top_k=2).compress_documents(
        docs, "q"
    )
    assert expanded_ids(out) == ["doc1", "doc3"]


def test_the_same_document_twice_keeps_each_occurrence(service, documents) -> None:
    """A retriever may return one Document object twice: each occurrence is its own chunk."""
    doc = documents[0]
    out = SemiDynamicDocumentCompressor(service=service, expand_top_k=1).compress_documents(
        [doc, doc, documents[1]], "q"
    )
    assert [d.metadata["semidyn_expanded"] for d in out] == [True, False, False]
    assert out[0].page_content == doc.page_content
    assert MARKER_PATTERN.fullmatch(out[1].page_content)
    assert len({out[1].page_content, out[2].page_content}) == 2  # two chunks, two slots


def test_an_expanded_document_left_out_of_the_prompt_is_an_error(
    service, documents, embeddings
) -> None:
    """Given as ``latent_documents``, expanded documents must reach the prompt too."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=2)
    every = SemiDynamicDocumentCompressor(service=service, expand_top_k=99)
    docs = every.compress_documents(documents, "q")
    with pytest.raises(IncompleteContextError, match="5 of the 5 expanded documents"):
        llm.invoke("Question: q", latent_documents=docs)
    mixed = SemiDynamicDocumentCompressor(service=service, expand_top_k=2)
    docs = mixed.compress_documents(scored(documents), "q")
    prompt = qa_prompt(service).format(
        context=format_docs([d for d in docs if not d.metadata["semidyn_expanded"]]), question="q"
    )
    with pytest.raises(IncompleteContextError, match="2 of the 2 expanded documents"):
        llm.invoke(prompt, latent_documents=docs)
    # re-flowed whitespace still holds the whole document
    docs = every.compress_documents(documents[:2], "q")
    reflowed = "\n\n".join(d.page_content.replace(" ", "\n ") for d in docs)
    llm.invoke(qa_prompt(service).format(context=reflowed, question="q"), latent_documents=docs)
    # a chain whose prompt drops {context} fails, also when every document was expanded
    retriever = FAISS.from_documents(documents, embeddings).as_retriever(search_kwargs={"k": 3})
    chain = create_semidyn_rag_chain(
        retriever, every, llm, prompt=PromptTemplate.from_template("Question: {question}")
    )
    with pytest.raises(IncompleteContextError, match="3 of the 3 expanded documents"):
        chain.invoke(QUESTION)


@pytest.mark.parametrize("k", [True, 1.0, "1", 1.5])
def test_the_budget_field_takes_an_int_as_the_per_call_budget_does(service, documents, k) -> None:
    """No silent coercion (``True`` or ``"1"`` read as 1): the same rule as ``expand_top_k=`` per
    call (`semidyn_rag.expansion.check_budget`)."""
    with pytest.raises(ValidationError, match="expand_top_k"):
        SemiDynamicDocumentCompressor(service=service, expand_top_k=k)
    with pytest.raises(ValidationError, match="expand_top_k"):
        SemiDynamicDocumentCompressor(service=service).with_expansion(k)
    with pytest.raises(TypeError, match="expand_top_k must be an int"):
        SemiDynamicDocumentCompressor(service=service).compress_documents(
            documents, "q", expand_top_k=k
        )
