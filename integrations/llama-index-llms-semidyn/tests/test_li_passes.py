"""One pass of each kind per LLM call: the prompt is parsed, read, rendered and embedded once.

Spies on the real code paths (`semidyn_rag.testing.PassCounter`): the marker pattern, the
decoder's rendering + tokenization and embedding, latent reads and the encoder.
"""

from __future__ import annotations

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from semidyn_rag.testing import PASSAGES

from llama_index.llms.semidyn import SemiDynamicLLM

QUESTION = "Where was Alice born?"


@pytest.fixture
def make_prompt(service):
    """The training prompt over two chunks with fresh markers (latents from memory after the
    first call): a slot serves one LLM call."""
    return lambda: service.qa_template(
        "\n".join(c.marker for c in service.compress(PASSAGES[:2])), QUESTION
    )


def one_pass_over(counter, prompt: str) -> None:
    assert counter.marker_scans == [prompt]  # parsed once
    assert counter.lookups == 1  # latents read from memory/store once
    assert counter.renders == 1  # rendered and tokenized once (positions, then embedding)
    assert counter.embeds == 1
    assert counter.encodes == 0  # compression encoded before the call


def test_complete_stream_and_chat(service, make_prompt, count_passes) -> None:
    llm = SemiDynamicLLM(service, max_new_tokens=3)
    calls = {
        "complete": lambda p: llm.complete(p, formatted=True),
        "stream_complete": lambda p: list(llm.stream_complete(p, formatted=True)),
        "chat": lambda p: llm.chat([ChatMessage(role=MessageRole.USER, content=p)]),
        "stream_chat": lambda p: list(
            llm.stream_chat([ChatMessage(role=MessageRole.USER, content=p)])
        ),
    }
    make_prompt()
    for name, call in calls.items():
        prompt = make_prompt()
        count_passes.reset()
        call(prompt)
        try:
            one_pass_over(count_passes, prompt)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


async def test_async_complete_and_chat(service, make_prompt, count_passes) -> None:
    llm = SemiDynamicLLM(service, max_new_tokens=3)
    prompt = make_prompt()
    count_passes.reset()
    await llm.acomplete(prompt, formatted=True)
    one_pass_over(count_passes, prompt)
    prompt = make_prompt()
    count_passes.reset()
    await llm.achat([ChatMessage(role=MessageRole.USER, content=prompt)])
    one_pass_over(count_passes, prompt)
