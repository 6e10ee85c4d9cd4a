"""The decoding path shared by `SemiDynamicLLM` and `ChatSemiDynamic`.

Both models receive a prompt string whose ``[[latent:<slot>]]`` markers stand for compressed chunks
(only live markers this process issued for the call do: those of the call's ``latent_documents``,
else those armed by `format_docs`; any other text, marker-like or not, a live marker pasted into
a question included, is text).
Each call parses its prompt once (`semidyn_rag.prompting.prepare_prompt`: markers resolved into
the `LatentPrompt` the decoder reads, positions counted, the window checked) before any slot is
used; generation is `LatentService`'s. This module adds what LangChain expects around it: which
markers the call reads, stop sequences, usage accounting, the chosen ratios, and streamed chunks
reported to the run's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import GenerationChunk
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from semidyn_rag.prompting import PreparedPrompt, prepare_prompt
from semidyn_rag.service import (
    IncompleteContextError,
    LatentService,
    Slot,
    is_marker,
    parse_prompt,
)
from transformers import StoppingCriteria, StoppingCriteriaList

from ._issued import issued
from ._stops import StopCutter

logger = logging.getLogger(__name__)

PREFIX_EXPANDED = "semidyn_expanded"


class TokenCounter(StoppingCriteria):
    """Counts the tokens ``generate`` produces; never stops anything.

    `LatentService` hands back text only, and re-tokenizing text miscounts (a byte-level token that
    decodes to a replacement character re-encodes as three), so the count comes from ``generate``.
    """

    def __init__(self) -> None:
        self.generated = 0
        self.last_token: int | None = None

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        # With ``inputs_embeds`` only, ``input_ids`` holds just the tokens generated so far.
        self.generated = int(input_ids.shape[-1])
        self.last_token = int(input_ids[0, -1]) if self.generated else None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


LATENT_DOCUMENTS = "latent_documents"
"""The call argument that delivers a call's compressed documents (see `delivered_slots`)."""


def delivered_slots(documents: Sequence[Document | str] | None) -> frozenset[str] | None:
    """The slot ids that ``documents`` deliver to one model call; ``None`` when not given.

    A compressed document (its ``page_content`` exactly one live marker) delivers its slot; an
    expanded document (``semidyn_expanded``), plain text and a marker already read deliver
    nothing. A string is read as a document's ``page_content``. A document whose marker this
    process issued but evicted before any call read it is an `UnknownMarkerError`: its chunk
    cannot be delivered.
    """
    if documents is None:
        return None
    if isinstance(documents, (str, Document)):
        documents = [documents]
    ids: set[str] = set()
    for doc in documents:
        if isinstance(doc, Document):
            if doc.metadata.get(PREFIX_EXPANDED) is True:
                continue
            text = doc.page_content
        elif isinstance(doc, str):
            text = doc
        else:
            raise TypeError(
                f"{LATENT_DOCUMENTS} takes the compressed Documents (or their page_content), "
                f"got a {type(doc).__name__}"
            )
        if (slot := _marker_slot(text)) is not None:
            ids.add(slot.id)
    return frozenset(ids)


def expanded_texts(documents: Sequence[Document | str] | None) -> tuple[str, ...]:
    """The texts of the expanded documents (``semidyn_expanded``) among ``documents``, in order.

    A call given them as ``latent_documents`` must hold each one whole (whitespace aside), as it
    must hold each compressed document's marker: an expanded chunk left out is a chunk lost.
    """
    if documents is None or isinstance(documents, str):
        return ()
    if isinstance(documents, Document):
        documents = [documents]
    return tuple(
        doc.page_content
        for doc in documents
        if isinstance(doc, Document)
        and doc.metadata.get(PREFIX_EXPANDED) is True
        and doc.page_content.strip()
    )


def _squeezed(text: str) -> str:
    """``text`` without whitespace: a prompt template or formatter may re-flow a document."""
    return "".join(text.split())


def _marker_slot(text: str) -> Slot | None:
    """The live slot when ``text`` is exactly one live marker (one parse), else ``None``."""
    parts = parse_prompt(text.strip(), check_fragments=False)
    return parts[0] if len(parts) == 1 and isinstance(parts[0], Slot) else None


class _ArmedSlots(Collection[str]):
    """Live slots of compressed documents formatted into a prompt by `format_docs` (bounded).

    A collection of slot ids, so that a call hands it to `LatentService.prepare` as the slots
    delivered to it: the prompt is parsed once, and only armed live markers carry latents.

    Arming is what lets a call given no ``latent_documents`` tell the markers put in its prompt
    on purpose from a live marker pasted into a question or chat history (from a bare
    ``retriever.invoke`` whose documents no call decoded): only armed markers carry latents.
    Single-use stays the slot registry's: a read slot's marker is text whether armed or not, so
    read slots are dropped when the registry fills, before the oldest armed ones.
    """

    def __init__(self, capacity: int = 1 << 17) -> None:
        self.capacity = capacity
        self._slots: OrderedDict[str, Slot] = OrderedDict()
        self._lock = threading.Lock()

    def arm(self, slots: Sequence[Slot]) -> None:
        with self._lock:
            for slot in slots:
                self._slots[slot.id] = slot
                self._slots.move_to_end(slot.id)
            if len(self._slots) > self.capacity:
                for slot_id in [i for i, s in self._slots.items() if not is_marker(s.marker)]:
                    del self._slots[slot_id]
            while len(self._slots) > self.capacity:
                self._slots.popitem(last=False)

    def __contains__(self, slot_id: object) -> bool:
        with self._lock:
            return slot_id in self._slots

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._slots))

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)


_ARMED = _ArmedSlots()


def arm_documents(documents: Sequence[Document]) -> None:
    """Arm the markers of ``documents`` that our compressor produced (see `format_docs`).

    A document is armed when it is the very object our compressor returned (`_issued`; a copy
    with the same metadata is not), its ``page_content`` is exactly one live marker and its metadata
    say the compressor made it for that very chunk (``semidyn_expanded`` false, ``semidyn_key``
    the slot's key); expanded documents, plain text and marker text in any other document
    (a retrieved document whose text is a marker) arm nothing. A marker of ours evicted before
    any call read it is an `UnknownMarkerError` (its chunk's latents are gone).
    """
    armed: list[Slot] = []
    for doc in documents:
        meta = doc.metadata
        if not issued(doc) or meta.get(PREFIX_EXPANDED) is not False:
            continue  # forged metadata on a copy arms nothing
        slot = _marker_slot(doc.page_content)
        if slot is not None and slot.key == meta.get("semidyn_key"):
            armed.append(slot)
    _ARMED.arm(armed)


def warn_as_text(prepared: PreparedPrompt, delivered: frozenset[str] | None) -> None:
    """Log the live markers that ``prepared`` reads as text (not issued for this call)."""
    if prepared.as_text:
        logger.warning(
            "%d latent marker(s) in the prompt were not issued for this call (%s) and are read "
            "as text; if they are this call's context, format the compressed documents with "
            "langchain_semidyn.format_docs or pass them as %s=",
            len(prepared.as_text),
            "from another compression than the call's documents"
            if delivered is not None
            else "not formatted by format_docs",
            LATENT_DOCUMENTS,
        )


@dataclass(frozen=True)
class Outcome:
    """One finished generation: the text LangChain sees and everything callbacks report."""

    text: str
    prepared: PreparedPrompt
    completion_tokens: int
    finish_reason: str
    stop: str | None
    model_name: str

    @property
    def token_usage(self) -> dict[str, int]:
        """OpenAI-style counts, the shape LangChain callbacks read from ``llm_output``."""
        prompt = self.prepared.positions
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    @property
    def info(self) -> dict[str, Any]:
        """Per-generation details: usage, finish reason and each latent span's chosen ratio."""
        contexts = self.prepared.contexts
        return {
            "model_name": self.model_name,
            "finish_reason": self.finish_reason,
            "stop": self.stop,
            **self.token_usage,
            "latent_positions": self.prepared.latent_positions,
            "latent_ratios": [c.ratio for c in contexts],
            "latent_counts": [c.num_latents for c in contexts],
            "latent_original_tokens": [c.num_tokens for c in contexts],
            "latent_keys": list(self.prepared.keys),
        }


ChunkT = TypeVar("ChunkT", bound=GenerationChunk)
"""The chunk type a model streams (`GenerationChunk`, or `ChatGenerationChunk` for chat)."""

_NOT_APPLICABLE = frozenset({"api_key", "base_url", "timeout", "max_retries", "streaming"})
"""LangChain's standard parameters for remote APIs: accepted, and meaningless for a local decoder."""


class LatentDecoding(BaseModel):
    """Fields and generation helpers common to the LLM and the chat model.

    Standard LangChain parameters: ``max_tokens`` (``max_new_tokens`` also accepted),
    ``temperature``, ``top_p``, ``stop`` and ``model`` (``model_name``), at construction or per
    call; HF ``generate`` arguments (``max_length``, ``do_sample``, ...) go in ``model_kwargs``
    or pass through per call.
    ``api_key``, ``base_url``, ``timeout``, ``max_retries`` and ``streaming`` are accepted and
    unused (there is no remote API); any other unknown parameter is a ``ValueError``.
    """

    # ``model_name`` is a field; older pydantic 2.x would warn about the ``model_`` namespace.
    model_config = ConfigDict(
        arbitrary_types_allowed=True, protected_namespaces=(), populate_by_name=True
    )

    service: LatentService
    """Resolves markers from this process's cache or the shared store; share it with the compressor."""
    max_tokens: int = Field(
        default=256, ge=1, validation_alias=AliasChoices("max_tokens", "max_new_tokens")
    )
    """Answer tokens at most (a call's ``max_tokens``, ``max_new_tokens`` or HF ``max_length``
    replaces it)."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 decodes greedily; above 0 samples with this temperature."""
    top_p: float | None = None
    """Nucleus sampling when ``temperature`` is above 0."""
    stop: list[str] | None = None
    """Default stop strings; a call's ``stop`` replaces them."""
    model_name: str | None = Field(
        default=None, validation_alias=AliasChoices("model_name", "model")
    )
    """Reported in metadata and traces; defaults to the compressor's decoder base model."""
    adapter: bool = True
    """False runs the untouched base decoder on plain text: the uncompressed baseline of the same
    base model (it refuses latent markers, which the base never learned to read)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """HF ``generate`` arguments for every call (e.g. ``repetition_penalty``); a call's win."""

    @model_validator(mode="before")
    @classmethod
    def _known_parameters(cls, data: Any) -> Any:
        """Refuse unknown parameters (a typo must not be ignored); drop inapplicable ones."""
        if not isinstance(data, dict):
            return data
        names = set(cls.model_fields) | {"max_new_tokens", "model"}
        unknown = sorted(set(data) - names - _NOT_APPLICABLE)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no parameter {', '.join(unknown)}; generation takes "
                "max_tokens, temperature, top_p and stop (HF generate arguments per call)"
            )
        return {k: v for k, v in data.items() if k not in _NOT_APPLICABLE}

    @property
    def max_new_tokens(self) -> int:
        """``max_tokens`` under the HF name."""
        return self.max_tokens

    @property
    def _model_name(self) -> str:
        config = self.service.compressor.config
        return self.model_name or config.decoder_model or config.encoder_model

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """What identifies this model to LangChain's caches and traces (the same for both models)."""
        return {
            "model_name": self._model_name,
            "fingerprint": self.service.compressor.fingerprint,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """Tracing parameters: provider ``semidyn``, the model, and this call's limits."""
        params = super()._get_ls_params(stop=stop, **kwargs)  # type: ignore[misc]
        model = kwargs.get("model")
        params["ls_provider"] = "semidyn"
        params["ls_model_name"] = model if isinstance(model, str) else self._model_name
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_tokens))
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        temperature = kwargs.get("temperature", self.temperature)
        if isinstance(temperature, (int, float)):
            params["ls_temperature"] = float(temperature)
        return params

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's LangChain parameters in HF ``generate`` terms, over the instance's.

        ``None`` for ``max_tokens``, ``max_new_tokens``, ``max_length``, ``temperature`` or
        ``top_p`` means the instance's value; a call is held to the constructor's bounds (a
        ``ValueError`` for a limit below 1, a negative temperature, a ``top_p`` outside (0, 1]).
        """
        call = {**self.model_kwargs, **kwargs}
        for name in ("max_tokens", "max_new_tokens", "max_length", "temperature", "top_p"):
            if name in call and call[name] is None:
                del call[name]
        model = call.pop("model", None)
        if model is not None and model != self._model_name:
            raise ValueError(
                f"{type(self).__name__} serves the compressor it was built with "
                f"({self._model_name}); it cannot switch to model {model!r} per call"
            )
        for name in ("max_tokens", "max_new_tokens", "max_length"):
            if name in call and (isinstance(call[name], bool) or int(call[name]) < 1):
                raise ValueError(f"{name} must be a positive number of tokens, got {call[name]!r}")
        if "max_tokens" in call:
            value = call.pop("max_tokens")
            if call.get("max_new_tokens") not in (None, value):
                raise ValueError("give max_tokens or max_new_tokens, not both")
            call["max_new_tokens"] = value
        temperature = call.pop("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(
                f"temperature must be 0 (greedy) or above (sampling), got {temperature}"
            )
        top_p = call.pop("top_p", self.top_p)
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        gen: dict[str, Any] = {}
        if call.get("max_new_tokens") is None and call.get("max_length") is None:
            gen["max_new_tokens"] = self.max_tokens
        if temperature > 0:
            gen["temperature"] = float(temperature)  # the decoder samples (do_sample follows)
            if top_p is not None:
                gen["top_p"] = top_p
        if not self.adapter:
            gen["adapter"] = False
        gen.update(call)
        return gen

    def _generate_kwargs(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], TokenCounter, list[str]]:
        """``generate`` keyword arguments for one call, with a token counter and the stop list.

        Stop strings also go to ``generate`` (``stop_strings``) so the decoder halts at them instead
        of running to the token limit; the text is still cut here, the LangChain contract.
        """
        stops = list(self.stop or []) if stop is None else list(stop)
        gen = self._call_kwargs(kwargs)
        counter = TokenCounter()
        gen["stopping_criteria"] = StoppingCriteriaList(
            [*(gen.get("stopping_criteria") or []), counter]
        )
        if stops:
            extra = gen.get("stop_strings") or []
            extra = [extra] if isinstance(extra, str) else list(extra)
            gen["stop_strings"] = list(dict.fromkeys([*extra, *stops]))
            gen.setdefault("tokenizer", self.service.compressor.decoder_tokenizer)
        return gen, counter, stops

    def _finish_reason(
        self, counter: TokenCounter, hit: str | None, gen: dict[str, Any], prompt_tokens: int
    ) -> str:
        eos = gen.get("eos_token_id", self.service.compressor.decoder_tokenizer.eos_token_id)
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        if hit is not None or counter.last_token in eos_ids:
            return "stop"
        limit = gen.get("max_new_tokens")
        if limit is None:  # HF max_length counts the prompt's positions too
            limit = int(gen["max_length"]) - prompt_tokens
        return "length" if counter.generated >= limit else "stop"

    def _outcome(
        self,
        text: str,
        prepared: PreparedPrompt,
        counter: TokenCounter,
        hit: str | None,
        gen: dict[str, Any],
    ) -> Outcome:
        return Outcome(
            text=text,
            prepared=prepared,
            completion_tokens=counter.generated,
            finish_reason=self._finish_reason(counter, hit, gen, prepared.positions),
            stop=hit,
            model_name=self._model_name,
        )

    # ------------------------------------------------------------------ sync
    def _prepare(
        self, prompts: list[str], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> list[tuple[PreparedPrompt, dict[str, Any], TokenCounter, list[str]]]:
        """Every prompt of one call prepared once, before any decoding or slot use.

        Each prompt is parsed, its latents read and its positions counted once
        (`semidyn_rag.prompting.prepare_prompt`); one that cannot fit the decoder's
        ``max_position_embeddings`` with its answer is a `ContextWindowError`.
        ``kwargs[LATENT_DOCUMENTS]`` (taken out here) delivers the call's compressed documents:
        only their slots expand, and each must reach one of the prompts, as must the text of each
        expanded document (an `IncompleteContextError` otherwise); without it, only the markers
        armed by `format_docs` do (the others are text, logged).
        """
        kwargs = dict(kwargs)
        documents = kwargs.pop(LATENT_DOCUMENTS, None)
        delivered = delivered_slots(documents)
        expanded = expanded_texts(documents)
        window = self.service.compressor.latent_decoder.max_positions
        out = []
        for prompt in prompts:
            gen, counter, stops = self._generate_kwargs(stop, kwargs)
            prepared = prepare_prompt(
                self.service,
                prompt,
                delivered=_ARMED if delivered is None else delivered,
                window=window,
                max_new_tokens=gen.get("max_new_tokens"),
                max_length=gen.get("max_length"),
            )
            warn_as_text(prepared, delivered)
            out.append((prepared, gen, counter, stops))
        if delivered:
            read = {s.id for prepared, *_ in out for s in prepared.slots}
            if lost := len(delivered - read):
                raise IncompleteContextError(
                    f"{lost} of the {len(delivered)} compressed documents given as "
                    f"{LATENT_DOCUMENTS} are not in the prompt; put every one in it (a prompt "
                    "template's {context}, filled with format_docs)"
                )
        if expanded:
            held = [_squeezed(p) for p in prompts]
            lost = sum(not any(_squeezed(t) in p for p in held) for t in expanded)
            if lost:
                raise IncompleteContextError(
                    f"{lost} of the {len(expanded)} expanded documents given as "
                    f"{LATENT_DOCUMENTS} are not in the prompt (whole); put every one in it "
                    "(a prompt template's {context}, filled with format_docs)"
                )
        return out

    def _decode_many(
        self, prompts: list[str], stop: list[str] | None, **kwargs: Any
    ) -> list[Outcome]:
        """One call's prompts: their slots are used together (a shared one serves them all)."""
        planned = self._prepare(prompts, stop, kwargs)
        resolved = [prepared.resolved for prepared, *_ in planned]
        self.service.use(*resolved)
        outcomes = []
        try:
            for prepared, gen, counter, stops in planned:
                cutter = StopCutter(stops)
                raw = self.service.complete(prepared.prompt, **gen)
                text = cutter.feed(raw) + cutter.flush()
                outcomes.append(self._outcome(text, prepared, counter, cutter.hit, gen))
        except BaseException:
            if not outcomes:  # the decoder read nothing: a retry may use the slots again
                self.service.release(*resolved)
            raise
        return outcomes

    def _decode(self, prompt: str, stop: list[str] | None, **kwargs: Any) -> Outcome:
        return self._decode_many([prompt], stop, **kwargs)[0]

    def _decode_stream(
        self, prompt: str, stop: list[str] | None, **kwargs: Any
    ) -> Iterator[str | Outcome]:
        """Text pieces as the decoder emits them (cut at a stop string), then the `Outcome`."""
        [(prepared, gen, counter, stops)] = self._prepare([prompt], stop, kwargs)
        cutter = StopCutter(stops)
        emitted: list[str] = []
        with contextlib.closing(self.service.stream(prepared.resolved, **gen)) as pieces:
            for piece in pieces:
                if text := cutter.feed(piece):
                    emitted.append(text)
                    yield text
                if cutter.stopped:
                    break
        if tail := cutter.flush():
            emitted.append(tail)
            yield tail
        yield self._outcome("".join(emitted), prepared, counter, cutter.hit, gen)

    def _stream_chunks(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        to_chunk: Callable[[str | Outcome], ChunkT],
        **kwargs: Any,
    ) -> Iterator[ChunkT]:
        """`_decode_stream` as the model's chunks (``to_chunk`` of each text piece, then of the
        `Outcome`), each reported to ``run_manager``'s ``on_llm_new_token`` before it is yielded."""
        for item in self._decode_stream(prompt, stop, **kwargs):
            chunk = to_chunk(item)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ async
    async def _adecode_many(
        self, prompts: list[str], stop: list[str] | None, **kwargs: Any
    ) -> list[Outcome]:
        """Async `_decode_many`: resolution and the decoder run in worker threads."""
        planned = await asyncio.to_thread(self._prepare, prompts, stop, kwargs)
        resolved = [prepared.resolved for prepared, *_ in planned]
        self.service.use(*resolved)
        outcomes = []
        try:
            for prepared, gen, counter, stops in planned:
                cutter = StopCutter(stops)
                raw = await self.service.acomplete(prepared.prompt, **gen)
                text = cutter.feed(raw) + cutter.flush()
                outcomes.append(self._outcome(text, prepared, counter, cutter.hit, gen))
        except BaseException:
            if not outcomes:
                self.service.release(*resolved)
            raise
        return outcomes

    async def _adecode(self, prompt: str, stop: list[str] | None, **kwargs: Any) -> Outcome:
        return (await self._adecode_many([prompt], stop, **kwargs))[0]

    async def _adecode_stream(
        self, prompt: str, stop: list[str] | None, **kwargs: Any
    ) -> AsyncIterator[str | Outcome]:
        """Async `_decode_stream`: the decoder runs in a worker thread of `LatentService`."""
        [(prepared, gen, counter, stops)] = await asyncio.to_thread(
            self._prepare, [prompt], stop, kwargs
        )
        cutter = StopCutter(stops)
        emitted: list[str] = []
        pieces = self.service.astream(prepared.resolved, **gen)
        try:
            async for piece in pieces:
                if text := cutter.feed(piece):
                    emitted.append(text)
                    yield text
                if cutter.stopped:
                    break
        finally:
            await pieces.aclose()
        if tail := cutter.flush():
            emitted.append(tail)
            yield tail
        yield self._outcome("".join(emitted), prepared, counter, cutter.hit, gen)

    async def _astream_chunks(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        to_chunk: Callable[[str | Outcome], ChunkT],
        **kwargs: Any,
    ) -> AsyncIterator[ChunkT]:
        """Async `_stream_chunks`, over `_adecode_stream` (closed with this generator: an async
        generator left behind is only closed when the event loop finalizes it)."""
        items = self._adecode_stream(prompt, stop, **kwargs)
        try:
            async for item in items:
                chunk = to_chunk(item)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            await items.aclose()
