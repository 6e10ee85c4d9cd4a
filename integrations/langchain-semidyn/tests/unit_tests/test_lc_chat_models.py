"""`ChatSemiDynamic`: one user prompt from system + human turns, usage in the message."""

from __future__ import annotations

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_semidyn import (
    ChatSemiDynamic,
    SemiDynamicDocumentCompressor,
    SemiDynamicLLM,
    format_docs,
    qa_chat_prompt,
    render_messages,
)

SAMPLING = {"do_sample": True, "temperature": 1.0}


@pytest.fixture
def make_messages(service, documents):
    """Builds the chat prompt over two compressed documents; fresh markers per call (the same
    latents): a slot carries latents into one LLM call only."""

    def make() -> list:
        compressor = SemiDynamicDocumentCompressor(service=service)
        docs = compressor.compress_documents(documents[:2], "q")
        return qa_chat_prompt(service).format_messages(
            context=format_docs(docs), question="Where is Paris?"
        )

    return make


@pytest.fixture
def chat(service) -> ChatSemiDynamic:
    return ChatSemiDynamic(service=service, max_new_tokens=12)


def test_render_keeps_system_and_human_turns_in_order() -> None:
    rendered = render_messages(
        [
            SystemMessage("Answer briefly."),
            HumanMessage("first"),
            AIMessage("an earlier answer"),
            ToolMessage("tool output", tool_call_id="1"),
            HumanMessage([{"type": "text", "text": "sec"}, "ond"]),
        ]
    )
    assert rendered == "Answer briefly.\n\nfirst\n\nsecond"
    with pytest.raises(ValueError, match="text only"):
        render_messages([HumanMessage([{"type": "image_url", "image_url": {"url": "x"}}])])
    with pytest.raises(ValueError, match="at least one"):
        render_messages([AIMessage("only me")])


def test_chat_answer_equals_llm_answer_with_usage(chat, service, make_messages) -> None:
    message = chat.invoke(make_messages())
    llm_text = SemiDynamicLLM(service=service, max_new_tokens=12).invoke(make_messages()[0].content)
    assert message.content == llm_text  # one human message renders to exactly its text
    usage = message.usage_metadata
    meta = message.response_metadata
    assert usage["output_tokens"] == 12
    assert usage["input_tokens"] == meta["prompt_tokens"] > meta["latent_positions"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + 12
    assert len(meta["latent_ratios"]) == len(meta["latent_counts"]) == 2
    assert meta["finish_reason"] == "length"


def test_stream_and_stop(chat, make_messages) -> None:
    torch.manual_seed(1)
    whole = chat.invoke(make_messages(), **SAMPLING).content
    torch.manual_seed(1)
    chunks = list(chat.stream(make_messages(), **SAMPLING))
    assert "".join(c.content for c in chunks) == whole
    assert len([c for c in chunks if c.content]) > 1
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.usage_metadata["output_tokens"] == 12
    assert total.response_metadata["latent_counts"]

    greedy = chat.invoke(make_messages()).content
    stop = greedy[2:4]
    cut = greedy[: greedy.index(stop)]
    stopped = chat.invoke(make_messages(), stop=[stop])
    assert stopped.content == cut
    assert stopped.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in chat.stream(make_messages(), stop=[stop])) == cut


@pytest.mark.asyncio
async def test_async(chat, make_messages) -> None:
    whole = chat.invoke(make_messages()).content
    assert (await chat.ainvoke(make_messages())).content == whole
    chunks = [c async for c in chat.astream(make_messages())]
    assert "".join(c.content for c in chunks) == whole
    assert chunks[-1].usage_metadata["output_tokens"] == 12
    stop = whole[2:4]
    assert (await chat.ainvoke(make_messages(), stop=[stop])).content == whole[: whole.index(stop)]
