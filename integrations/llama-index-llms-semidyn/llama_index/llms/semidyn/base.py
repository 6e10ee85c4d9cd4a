"""`SemiDynamicLLM`: a LlamaIndex LLM that reads compressed chunks through their markers.

A query engine hands the LLM one string (``complete(prompt, formatted=True)``); the nodes that
`SemiDynamicNodePostprocessor` compressed arrive in it as ``[[latent:<slot>]]`` markers. This LLM
resolves each marker into that chunk's latent span (service memory, then the latent store) and
decodes with the compressor's decoder, so the model reads a few latent positions per chunk instead
of the chunk's tokens. Generation, streaming and marker resolution are `LatentService`'s; this
module only translates between LlamaIndex's objects and it.

LlamaIndex's response modes pack prompts by a text token count. :meth:`SemiDynamicLLM.prompt_helper`
counts what the decoder really reads (a marker costs its latent positions); whatever packing is
used, every call checks that each chunk retrieved for the query arrives whole and that the prompt
fits the decoder, and raises a `LatentDeliveryError` (a ``RuntimeError``, which Refine does not
swallow) otherwise.
"""

from __future__ import annotations

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
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from semidyn_rag import prompting
from semidyn_rag.prompting import PreparedPrompt, prepare_prompt
from semidyn_rag.service import LatentService, MalformedMarkerError, Slot, parse_prompt

__all__ = ["MalformedMarkerError", "SemiDynamicLLM", "render_messages"]


def render_messages(messages: Sequence[ChatMessage]) -> str:
    """One prompt for a chat: system and user texts in order, joined by blank lines.

    `semidyn_rag.prompting.render_messages` over each message's role and text: the decoder was
    trained on single-turn prompts, so a conversation becomes one user message; assistant and
    tool messages are left out. Raises ``ValueError`` for a chat without system or user text.
    """
    return prompting.render_messages((m.role.value, m.content) for m in messages)


class SemiDynamicLLM(CustomLLM):
    """Completion LLM over a `LatentService` (share the service with the postprocessor).

    Example:
        .. code-block:: python

            service = LatentService(compressor, store)
            llm = SemiDynamicLLM(service, max_new_tokens=64)
            llm.complete(service.qa_template(marker, "Who founded Lyon?"))

    Prompts without markers are plain generation by the decoder; text that only looks like a
    marker is text, and so is a marker whose slot an earlier call already read: a slot carries
    latents into the one LLM call it was issued for (token counting and ``prompt_helper`` use
    none). A marker the service cannot resolve raises `UnknownMarkerError`, a cut marker
    `MalformedMarkerError`, a prompt holding only some of the chunks retrieved for its query
    `IncompleteContextError`, and a prompt the decoder cannot hold `ContextWindowError` (all
    `LatentDeliveryError`). Chat goes through LlamaIndex's completion-to-chat derivation with
    :func:`render_messages`.

    ``max_new_tokens`` (also accepted as ``max_tokens``, here and per call) bounds the answer
    unless ``generate_kwargs`` or a call gives ``max_new_tokens`` or ``max_length`` (HF: prompt
    positions included); ``temperature`` above 0 (the field, ``generate_kwargs`` or a call, the
    last winning) samples. An unknown constructor parameter, a negative temperature or a limit
    below 1 is a ``ValueError``.

    ``adapter=False`` runs the untouched base decoder on plain text: the honest uncompressed
    baseline on the same base model; the core refuses markers there (the base never learned to
    read latents).
    """

    model_name: str = Field(default="semidyn", description="Name reported in metadata.")
    context_window: int = Field(
        default=0, description="Decoder positions; 0: the decoder's max_position_embeddings."
    )
    max_new_tokens: int = Field(
        default=256, gt=0, description="Tokens to generate at most (alias: max_tokens)."
    )
    temperature: float = Field(
        default=0.0, ge=0.0, description="0 decodes greedily; above 0 samples at it."
    )
    adapter: bool = Field(
        default=True, description="False: the base decoder without its LoRA (plain baseline)."
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed to the decoder's generate (e.g. do_sample)."
    )
    _service: LatentService = PrivateAttr()

    def __init__(self, service: LatentService, **kwargs: Any) -> None:
        if "max_tokens" in kwargs:  # LlamaIndex's usual name for the answer budget
            value = kwargs.pop("max_tokens")
            if kwargs.get("max_new_tokens", value) != value:
                raise ValueError("give max_tokens or max_new_tokens, not both")
            kwargs["max_new_tokens"] = value
        if unknown := sorted(set(kwargs) - set(type(self).model_fields)):
            # pydantic would drop them: a temperature or top_p given here would be ignored
            raise ValueError(
                f"SemiDynamicLLM has no parameter {', '.join(unknown)}; generation takes "
                "max_new_tokens (or max_tokens) and temperature, other HF generate arguments "
                "(top_p, do_sample, ...) go in generate_kwargs or per call"
            )
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
        """The decoder's window and answer budget; count prompts with :meth:`count_tokens`."""
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=False,
            model_name=self.model_name,
        )

    def count_tokens(self, text: str) -> list[int]:
        """Decoder tokens of ``text`` with each marker counted as its latent positions.

        A tokenizer for LlamaIndex's token counting (``PromptHelper(tokenizer=...)``): the list's
        length is what the decoder reads; a marker's entries are ``-1`` placeholders.
        """
        tok = self._service.compressor.decoder_tokenizer
        out: list[int] = []
        for part in parse_prompt(text, check_fragments=False):
            if isinstance(part, Slot):
                out += [-1] * self._latent_count(part)
            else:
                out += tok(part, add_special_tokens=False)["input_ids"]
        return out

    def _latent_count(self, slot: Slot) -> int:
        if slot.num_latents is not None:
            return slot.num_latents
        return self._service.lookup([slot.key])[slot.key].num_latents

    def prompt_helper(self, **kwargs: Any) -> PromptHelper:
        """A `PromptHelper` with this LLM's window, answer budget and :meth:`count_tokens`.

        Give it to a stock synthesizer (``get_response_synthesizer(prompt_helper=...)``) so that
        ``compact`` and ``tree_summarize`` pack by what the decoder really reads.
        """
        return PromptHelper.from_llm_metadata(self.metadata, tokenizer=self.count_tokens, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _prepare(
        self, prompt: str, formatted: bool, gen: dict[str, Any]
    ) -> tuple[PreparedPrompt, dict[str, Any]]:
        """Prepare a prompt for the decoder once, refusing one that lost a chunk or overflows.

        One pass (`semidyn_rag.prompting.prepare_prompt`): every chunk of each query the prompt
        touches must be there, whole (a response mode that splits them over calls or truncates
        them fails here), and prompt plus answer must fit ``context_window``. The slots are used
        when decoding starts (`LatentService.complete`).
        """
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        prepared = prepare_prompt(
            self._service,
            prompt,
            whole_groups=True,
            window=self.context_window,
            max_new_tokens=gen.get("max_new_tokens"),
            max_length=gen.get("max_length"),
            adapter=self.adapter,
        )
        return prepared, {"latent_keys": list(prepared.keys)}

    def _kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's generation arguments over ``generate_kwargs`` and the fields, in HF terms.

        ``max_tokens`` (LlamaIndex's name) is ``max_new_tokens``; ``None`` for either, or for
        ``temperature``, means the default. A negative ``temperature`` or a limit below 1 is a
        ``ValueError``.
        """
        call = {**self.generate_kwargs, **kwargs}
        if "max_tokens" in call:
            value = call.pop("max_tokens")
            if value is not None and call.get("max_new_tokens") not in (None, value):
                raise ValueError("give max_tokens or max_new_tokens, not both")
            call["max_new_tokens"] = value if value is not None else call.get("max_new_tokens")
        call = {
            k: v
            for k, v in call.items()
            if v is not None or k not in ("max_new_tokens", "max_length", "temperature")
        }
        if call.get("max_new_tokens") is not None and int(call["max_new_tokens"]) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {call['max_new_tokens']}")
        temperature = call.get("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(
                f"temperature must be 0 (greedy) or above (sampling), got {temperature}"
            )
        out: dict[str, Any] = {}
        if temperature > 0:
            out["temperature"] = float(temperature)  # the decoder samples (do_sample follows)
        out.update(call)
        if out.get("max_new_tokens") is None and out.get("max_length") is None:
            out["max_new_tokens"] = self.max_new_tokens
        if not self.adapter:
            out["adapter"] = False
        return out

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        gen = self._kwargs(kwargs)
        prepared, info = self._prepare(prompt, formatted, gen)
        text = self._service.complete(prepared.resolved, **gen)
        return CompletionResponse(text=text, additional_kwargs=info)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Decoder tokens as they are produced (markers are resolved before the first one)."""
        gen = self._kwargs(kwargs)
        prepared, info = self._prepare(prompt, formatted, gen)
        pieces = self._service.stream(prepared.resolved, **gen)

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
        gen = self._kwargs(kwargs)
        prepared, info = self._prepare(prompt, formatted, gen)
        text = await self._service.acomplete(prepared.resolved, **gen)
        return CompletionResponse(text=text, additional_kwargs=info)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """Async token stream; an unknown marker raises at the first iteration."""
        gen = self._kwargs(kwargs)
        prepared, info = self._prepare(prompt, formatted, gen)
        pieces = self._service.astream(prepared.resolved, **gen)

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
