"""`ChatSemiDynamic`: a LangChain chat model that reads compressed chunks through their markers.

The decoder was trained on single-turn prompts: one user message, ``Context: <latents>\\nQuestion:
...``, rendered with its chat template. So the chat model renders a conversation into **one user
message**: the text of the system and human messages, in order, joined by blank lines. Assistant,
tool and function messages are left out (the decoder never saw multi-turn histories, and an
earlier answer is not evidence). Markers may appear in any system or human message; which of
them carry latents is decided on the rendered prompt, as for `SemiDynamicLLM`
(``latent_documents``, else the newest compression call): a marker pasted into the chat
history from an earlier compression is text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from semidyn_rag import prompting

from ._decoding import LatentDecoding, Outcome

_LAST: dict[str, Any] = (
    {"chunk_position": "last"} if "chunk_position" in AIMessageChunk.model_fields else {}
)
"""Marks our usage chunk as the stream's last (langchain-core >= 1.0 adds an empty one otherwise)."""


def _role(message: BaseMessage) -> str | None:
    return getattr(message, "role", None) if message.type == "chat" else message.type


def _text(message: BaseMessage) -> str:
    """A message's text; non-text content (images, audio) has no place in a latent prompt."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatSemiDynamic reads text only; got a {kind!r} content block")
    return "".join(parts)


def render_messages(messages: Sequence[BaseMessage]) -> str:
    """The single user prompt for ``messages``: system and human texts in order, blank-line joined.

    `semidyn_rag.prompting.render_messages` over each message's role and text (assistant and tool
    messages left out). Raises ``ValueError`` for non-text content and for a chat without any
    system or human text.
    """
    return prompting.render_messages(_turn(m) for m in messages)


def _turn(message: BaseMessage) -> tuple[str | None, str | None]:
    """``(role, text)``; the text of a message left out is not read (whatever its content)."""
    role = _role(message)
    return role, _text(message) if role in prompting.USER_ROLES else None


def _usage(outcome: Outcome) -> UsageMetadata:
    usage = outcome.token_usage
    return UsageMetadata(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
    )


class ChatSemiDynamic(LatentDecoding, BaseChatModel):
    """Chat model over a `LatentService` (see the module docstring for how messages are rendered).

    The answer's ``usage_metadata`` counts input tokens as decoder positions (latent positions
    included); ``response_metadata`` carries ``finish_reason``, ``latent_ratios``,
    ``latent_counts`` and ``latent_positions``.
    """

    @property
    def _llm_type(self) -> str:
        return "semidyn-chat"

    def _result(self, outcome: Outcome) -> ChatResult:
        message = AIMessage(content=outcome.text, usage_metadata=_usage(outcome))
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=outcome.info)],
            llm_output={"token_usage": outcome.token_usage, "model_name": outcome.model_name},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(self._decode(render_messages(messages), stop, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result(await self._adecode(render_messages(messages), stop, **kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Real decoder tokens as they come; a last empty chunk carries usage and ratios."""
        yield from self._stream_chunks(
            render_messages(messages), stop, run_manager, _chunk, **kwargs
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt = render_messages(messages)
        async for chunk in self._astream_chunks(prompt, stop, run_manager, _chunk, **kwargs):
            yield chunk


def _chunk(item: str | Outcome) -> ChatGenerationChunk:
    """A text piece, or the final empty chunk with usage and the generation's info."""
    if isinstance(item, Outcome):
        message = AIMessageChunk(content="", usage_metadata=_usage(item), **_LAST)
        return ChatGenerationChunk(message=message, generation_info=item.info)
    return ChatGenerationChunk(message=AIMessageChunk(content=item))
