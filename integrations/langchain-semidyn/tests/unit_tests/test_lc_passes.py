"""One pass of each kind per model call: the prompt is parsed, read, rendered and embedded once.

Spies on the real code paths (`semidyn_rag.testing.PassCounter`): the marker pattern, the
decoder's rendering + tokenization and embedding, latent reads and the encoder.
"""

from __future__ import annotations

import pytest

from langchain_semidyn import (
    ChatSemiDynamic,
    SemiDynamicDocumentCompressor,
    SemiDynamicLLM,
    format_docs,
    qa_chat_prompt,
    qa_prompt,
)

QUESTION = "Where is Paris?"


@pytest.fixture
def compress(service, documents):
    """Fresh marker documents for two chunks (a slot serves one call; latents from memory)."""
    compressor = SemiDynamicDocumentCompressor(service=service)
    return lambda: compressor.compress_documents(documents[:2], "q")


def one_pass_over(counter, prompt: str) -> None:
    assert counter.marker_scans == [prompt]  # parsed once
    assert counter.lookups == 1  # latents read from memory/store once
    assert counter.renders == 1  # rendered and tokenized once (positions, then embedding)
    assert counter.embeds == 1
    assert counter.encodes == 0  # the compressor step encoded


def test_compression_encodes_once(compress, count_passes) -> None:
    compress()
    assert count_passes.encodes == 1
    count_passes.reset()
    compress()
    assert count_passes.encodes == 0  # the same chunks again: from memory


def test_llm_call(service, compress, count_passes) -> None:
    llm = SemiDynamicLLM(service=service, max_new_tokens=3)
    for call in (llm.invoke, lambda p: "".join(llm.stream(p))):
        prompt = qa_prompt(service).format(context=format_docs(compress()), question=QUESTION)
        count_passes.reset()
        call(prompt)
        one_pass_over(count_passes, prompt)


async def test_async_llm_call(service, compress, count_passes) -> None:
    llm = SemiDynamicLLM(service=service, max_new_tokens=3)
    prompt = qa_prompt(service).format(context=format_docs(compress()), question=QUESTION)
    count_passes.reset()
    await llm.ainvoke(prompt)
    one_pass_over(count_passes, prompt)


def test_chat_call(service, compress, count_passes) -> None:
    chat = ChatSemiDynamic(service=service, max_new_tokens=3)
    for call in (chat.invoke, lambda m: list(chat.stream(m))):
        messages = qa_chat_prompt(service).format_messages(
            context=format_docs(compress()), question=QUESTION
        )
        count_passes.reset()
        call(messages)
        one_pass_over(count_passes, messages[0].content)


def test_call_with_latent_documents(service, compress, count_passes) -> None:
    """Each delivered document's marker is read once, the prompt once."""
    llm = SemiDynamicLLM(service=service, max_new_tokens=3)
    docs = compress()
    prompt = qa_prompt(service).format(context=format_docs(docs), question=QUESTION)
    count_passes.reset()
    llm.invoke(prompt, latent_documents=docs)
    documents = [d.page_content for d in docs]
    assert count_passes.marker_scans == [*documents, prompt]
    count_passes.marker_scans = [prompt]
    one_pass_over(count_passes, prompt)
