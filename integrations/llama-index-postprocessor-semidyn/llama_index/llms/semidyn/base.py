"""`SemiDynamicLLM`: a LlamaIndex LLM that reads compressed chunks through their markers.

A query engine hands the LLM one string (``complete(prompt, formatted=True)``); the nodes that
`SemiDynamicNodePostprocessor` compressed arrive in it as ``[[latent:<key>]]`` markers. This LLM
resolves each marker into that chunk's latent span (service memory, then the latent store) and
decodes with the compressor's decoder, so the model reads a few latent positions per chunk instead
of the chunk's tokens. Generation, streaming and marker resolution are `LatentService`'s; this
module only translates between LlamaIndex's objects and it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from semidyn_rag.service import MARKER_PATTERN, LatentService, marker

logger = logging.getLogger(__name__)

_MARKER_START = marker("")[:-2]  # "[[latent:"
_USER_ROLES = (MessageRole.SYSTEM, MessageRole.USER)


class MalformedMarkerError(ValueError):
    """The prompt holds a cut or altered latent marker (e.g. re-split by a response mode)."""


def render_messages(messages: Sequence[ChatMessage]) -> str:
    """One prompt for a chat: system and user texts in order, joined by blank lines.

    The decoder was trained on single-turn prompts (one user message, rendered with its own chat
    template), so a conversation becomes one user message. Assistant and tool messages are left
    out: the decoder never saw multi-turn histories, and an earlier answer is not evidence.
    """
    kept = [m.content for m in messages if m.role in _USER_ROLES and m.content]
    if dropped := len(messages) - len(kept):
        logger.debug("left %d non-user or empty message(s) out of the prompt", dropped)
    return "\n\n".join(kept)


class SemiDynamicLLM(CustomLLM):
    """Completion LLM over a `LatentService` (share the service with the postprocessor).

    Example:
        .. code-block:: python

            service = LatentService(compressor, store)
            llm = SemiDynamicLLM(service, max_new_tokens=64)
            llm.complete(service.qa_template(marker, "Who founded Lyon?"))

    Prompts without markers are plain generation by the decoder. A marker the service cannot
    resolve raises `UnknownMarkerError`; a cut marker raises `MalformedMarkerError`. Chat goes
    through LlamaIndex's completion-to-chat derivation with :func:`render_messages`.

    ``adapter=False`` runs the untouched base decoder on plain text: the honest uncompressed
    baseline on the same base model; the core refuses markers there (the base never learned to
    read latents).
    """

    model_name: str = Field(default="semidyn", description="Name reported in metadata.")
    context_window: int = Field(
        default=0, description="Decoder positions; 0: the decoder's max_position_embeddings."
    )
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    adapter: bool = Field(
        default=True, description="False: the base decoder without its LoRA (plain baseline)."
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed to the decoder's generate (e.g. do_sample)."
    )
    _service: LatentService = PrivateAttr()

    def __init__(self, service: LatentService, **kwargs: Any) -> None:
        kwargs.setdefault("messages_to_prompt", render_messages)
        super().__init__(**kwargs)
        self._service = service
        if not self.context_window:
            config = service.compressor.decoder.get_base_model().config
            self.context_window = int(getattr(config, "max_position_embeddings", 4096))

    @classmethod
    def class_name(cls) -> str:
        return "SemiDynamicLLM"

    @property
    def service(self) -> LatentService:
        return self._service

    @property
    def metadata(self) -> LLMMetadata:
        """Note: the prompt helper counts a marker's text tokens, not its latent positions."""
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=False,
            model_name=self.model_name,
        )

    # ------------------------------------------------------------------ helpers
    def _prepare(self, prompt: str, formatted: bool) -> str:
        """Apply ``completion_to_prompt`` to raw prompts and refuse prompts it cannot read."""
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        found = len(MARKER_PATTERN.findall(prompt))
        if prompt.count(_MARKER_START) != found:
            raise MalformedMarkerError(
                "the prompt holds a cut or altered latent marker: a response mode re-split the "
                "context by token count (use response_mode='simple_summarize' or "
                "SemiDynamicSynthesizer; 'compact' and 'refine' re-split text)"
            )
        return prompt

    def _kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, **self.generate_kwargs}
        out.update(kwargs)
        if not self.adapter:
            out["adapter"] = False
        return out

    @staticmethod
    def _info(prompt: str) -> dict[str, Any]:
        return {"latent_keys": MARKER_PATTERN.findall(prompt)}

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        prompt = self._prepare(prompt, formatted)
        text = self._service.complete(prompt, **self._kwargs(kwargs))
        return CompletionResponse(text=text, additional_kwargs=self._info(prompt))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Decoder tokens as they are produced (markers are resolved before the first one)."""
        prompt = self._prepare(prompt, formatted)
        pieces = self._service.stream(prompt, **self._kwargs(kwargs))
        info = self._info(prompt)

        def gen() -> CompletionResponseGen:
            text = ""
            try:
                for piece in pieces:
                    text += piece
                    yield CompletionResponse(text=text, delta=piece, additional_kwargs=info)
            finally:  # a consumer that stops early stops the decoder too
                if close := getattr(pieces, "close", None):
                    close()

        return gen()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """Async completion: the decoder runs in a worker thread, the event loop stays free."""
        prompt = self._prepare(prompt, formatted)
        text = await self._service.acomplete(prompt, **self._kwargs(kwargs))
        return CompletionResponse(text=text, additional_kwargs=self._info(prompt))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """Async token stream; an unknown marker raises at the first iteration."""
        prompt = self._prepare(prompt, formatted)
        pieces = self._service.astream(prompt, **self._kwargs(kwargs))
        info = self._info(prompt)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            try:
                async for piece in pieces:
                    text += piece
                    yield CompletionResponse(text=text, delta=piece, additional_kwargs=info)
            finally:
                if aclose := getattr(pieces, "aclose", None):
                    await aclose()

        return gen()

    # ------------------------------------------------------------------ async chat
    # CustomLLM derives sync chat from complete; its async chat calls the sync methods, which
    # would block the event loop for a whole generation, so these go through the async ones.
    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt = self.messages_to_prompt(messages)
        response = await self.acomplete(prompt, formatted=True, **kwargs)
        return completion_response_to_chat_response(response)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        prompt = self.messages_to_prompt(messages)
        stream = await self.astream_complete(prompt, formatted=True, **kwargs)
        return astream_completion_response_to_chat_response(stream)
