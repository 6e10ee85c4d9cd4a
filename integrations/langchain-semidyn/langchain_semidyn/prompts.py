"""The prompt a chain puts around compressed documents.

The decoder was trained on one prompt format (the compressor's ``prompt_template``, by default
``"Context: {context}\\nQuestion: {question}"``) with the contexts' placeholders one per line.
Building the chain's prompt from the same template keeps the model on familiar ground.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from semidyn_rag.service import LatentService

from ._decoding import arm_documents


def format_docs(documents: Sequence[Document]) -> str:
    """Documents' contents one per line (the layout of the training prompt's contexts).

    Also arms the markers of the documents our compressor produced (`SemiDynamicDocumentCompressor`):
    a model call given no ``latent_documents`` reads the latents of armed markers only, and any
    other live marker in its prompt (one from a bare ``retriever.invoke``, pasted into a question
    or chat history) is text. So a prompt built from compressed documents needs this function
    (``retriever | format_docs`` in LCEL) or the call's ``latent_documents=docs``; a string you
    format yourself from their ``page_content`` delivers no latents (logged as a warning).
    Expanded documents and plain text arm nothing.
    """
    arm_documents(documents)
    return "\n".join(doc.page_content for doc in documents)


def qa_template(service: LatentService) -> str:
    """The training prompt with LangChain's ``{context}`` and ``{question}`` variables."""
    return service.qa_template("{context}", "{question}")


def qa_prompt(service: LatentService) -> PromptTemplate:
    """A string prompt for `SemiDynamicLLM` (a chat model reads it as one human message too)."""
    return PromptTemplate.from_template(qa_template(service))


def qa_chat_prompt(service: LatentService) -> ChatPromptTemplate:
    """The same prompt as a single human message for `ChatSemiDynamic`."""
    return ChatPromptTemplate.from_messages([("human", qa_template(service))])
