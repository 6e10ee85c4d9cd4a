"""A retrieval chain in LCEL: retriever | compressor | prompt | model.

Document compressors are not runnables, and a compressor needs the question next to the documents,
so the chain carries both in a dict until the prompt is filled.
"""

from __future__ import annotations

from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import BasePromptTemplate
from langchain_core.retrievers import RetrieverLike
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
)

from ._decoding import LATENT_DOCUMENTS
from .document_compressors import SemiDynamicDocumentCompressor
from .prompts import format_docs, qa_prompt


def compression_step(
    compressor: SemiDynamicDocumentCompressor,
) -> Runnable[dict[str, Any], list[Document]]:
    """``{"documents", "question"}`` → marker documents (sync and async, callbacks passed on).

    Optional ``"scale"`` and ``"expand_top_k"`` keys override the compressor's for that input.
    """

    def compress(inputs: dict[str, Any], config: RunnableConfig) -> list[Document]:
        return compressor.compress_documents(
            inputs["documents"],
            inputs["question"],
            callbacks=config.get("callbacks"),
            scale=inputs.get("scale"),
            expand_top_k=inputs.get("expand_top_k"),
        )

    async def acompress(inputs: dict[str, Any], config: RunnableConfig) -> list[Document]:
        return await compressor.acompress_documents(
            inputs["documents"],
            inputs["question"],
            callbacks=config.get("callbacks"),
            scale=inputs.get("scale"),
            expand_top_k=inputs.get("expand_top_k"),
        )

    return RunnableLambda(compress, afunc=acompress, name="SemiDynamicCompression")


def create_semidyn_rag_chain(
    retriever: RetrieverLike,
    compressor: SemiDynamicDocumentCompressor,
    model: BaseLanguageModel,
    prompt: BasePromptTemplate | None = None,
) -> Runnable[str, dict[str, Any]]:
    """question → ``{"question", "documents", "context", "answer"}``.

    ``documents`` are the compressed (marker) documents, whose metadata keeps the original text for
    citations; ``prompt`` defaults to the compressor's training prompt (`qa_prompt`).

    The model reads the latents of this run's compressed documents only: they are handed to it
    as ``latent_documents``, so any other marker in the prompt (one pasted into the question) is
    text, and a document the prompt leaves out is an `IncompleteContextError`.
    """
    prompt = prompt or qa_prompt(compressor.service)

    def answer(inputs: dict[str, Any]) -> Runnable[dict[str, Any], str]:
        delivered = model.bind(**{LATENT_DOCUMENTS: list(inputs["documents"])})
        return prompt | delivered | StrOutputParser()

    return (
        RunnableParallel(question=RunnablePassthrough(), documents=retriever)
        | RunnablePassthrough.assign(documents=compression_step(compressor))
        | RunnablePassthrough.assign(context=lambda x: format_docs(x["documents"]))
        | RunnablePassthrough.assign(answer=RunnableLambda(answer, name="SemiDynamicAnswer"))
    )
