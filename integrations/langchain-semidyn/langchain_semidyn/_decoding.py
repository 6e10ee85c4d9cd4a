"""The decoding path shared by `SemiDynamicLLM` and `ChatSemiDynamic`.

Both models receive a prompt string whose ``[[latent:<key>]]`` markers stand for compressed chunks.
Generation itself is `LatentService`'s (it resolves markers into latent spans); this module adds
what LangChain expects around it: stop sequences, usage accounting and the chosen ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from semidyn_rag.service import MARKER_PATTERN, LatentService
from semidyn_rag.types import CompressedContext
from transformers import StoppingCriteria, StoppingCriteriaList

from ._stops import StopCutter


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


@dataclass(frozen=True)
class PromptAccount:
    """What the decoder reads for one prompt: its positions and the latent spans in it."""

    prompt_tokens: int
    """Decoder input positions: chat-template text tokens plus every latent position."""
    keys: tuple[str, ...]
    contexts: tuple[CompressedContext, ...]

    @property
    def latent_positions(self) -> int:
        return sum(c.num_latents for c in self.contexts)


def account_prompt(service: LatentService, prompt: str) -> PromptAccount:
    """Resolve ``prompt`` (unknown markers raise here, before any decoding) and count positions."""
    resolved = service.resolve(prompt)
    keys = tuple(MARKER_PATTERN.findall(prompt))
    found = service.lookup(keys) if keys else {}
    with torch.inference_mode():
        _, mask, _ = service.compressor.embed_prompts([resolved])
    return PromptAccount(int(mask.sum()), keys, tuple(found[k] for k in keys))


@dataclass(frozen=True)
class Outcome:
    """One finished generation: the text LangChain sees and everything callbacks report."""

    text: str
    account: PromptAccount
    completion_tokens: int
    finish_reason: str
    stop: str | None
    model_name: str

    @property
    def token_usage(self) -> dict[str, int]:
        """OpenAI-style counts, the shape LangChain callbacks read from ``llm_output``."""
        prompt = self.account.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    @property
    def info(self) -> dict[str, Any]:
        """Per-generation details: usage, finish reason and each latent span's chosen ratio."""
        contexts = self.account.contexts
        return {
            "model_name": self.model_name,
            "finish_reason": self.finish_reason,
            "stop": self.stop,
            **self.token_usage,
            "latent_positions": self.account.latent_positions,
            "latent_ratios": [c.ratio for c in contexts],
            "latent_counts": [c.num_latents for c in contexts],
            "latent_original_tokens": [c.num_tokens for c in contexts],
            "latent_keys": list(self.account.keys),
        }


class LatentDecoding(BaseModel):
    """Fields and generation helpers common to the LLM and the chat model."""

    # ``model_name`` is a field; older pydantic 2.x would warn about the ``model_`` namespace.
    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    service: LatentService
    """Resolves markers from this process's cache or the shared store; share it with the compressor."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples with this temperature."""
    top_p: float | None = None
    stop: list[str] | None = None
    """Default stop strings; a call's ``stop`` replaces them."""
    model_name: str | None = None
    """Reported in metadata; defaults to the compressor's decoder base model."""
    adapter: bool = True
    """False runs the untouched base decoder on plain text: the uncompressed baseline of the same
    base model (it refuses latent markers, which the base never learned to read)."""

    @property
    def _model_name(self) -> str:
        config = self.service.compressor.config
        return self.model_name or config.decoder_model or config.encoder_model

    @property
    def _decoding_params(self) -> dict[str, Any]:
        return {
            "model_name": self._model_name,
            "fingerprint": self.service.compressor.fingerprint,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

    def _generate_kwargs(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], TokenCounter, list[str]]:
        """``generate`` keyword arguments for one call, with a token counter and the stop list.

        Stop strings also go to ``generate`` (``stop_strings``) so the decoder halts at them instead
        of running to ``max_new_tokens``; the text is still cut here, the LangChain contract.
        """
        stops = list(self.stop or []) if stop is None else list(stop)
        gen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                gen["top_p"] = self.top_p
        if not self.adapter:
            gen["adapter"] = False
        gen.update(kwargs)
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

    def _finish_reason(self, counter: TokenCounter, hit: str | None, gen: dict[str, Any]) -> str:
        eos = gen.get("eos_token_id", self.service.compressor.decoder_tokenizer.eos_token_id)
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        if hit is not None or counter.last_token in eos_ids:
            return "stop"
        return "length" if counter.generated >= gen["max_new_tokens"] else "stop"

    def _outcome(
        self,
        text: str,
        account: PromptAccount,
        counter: TokenCounter,
        hit: str | None,
        gen: dict[str, Any],
    ) -> Outcome:
        return Outcome(
            text=text,
            account=account,
            completion_tokens=counter.generated,
            finish_reason=self._finish_reason(counter, hit, gen),
            stop=hit,
            model_name=self._model_name,
        )

    # ------------------------------------------------------------------ sync
    def _decode(self, prompt: str, stop: list[str] | None, **kwargs: Any) -> Outcome:
        account = account_prompt(self.service, prompt)
        gen, counter, stops = self._generate_kwargs(stop, kwargs)
        cutter = StopCutter(stops)
        raw = self.service.complete(prompt, **gen)
        text = cutter.feed(raw) + cutter.flush()
        return self._outcome(text, account, counter, cutter.hit, gen)

    def _decode_stream(
        self, prompt: str, stop: list[str] | None, **kwargs: Any
    ) -> Iterator[str | Outcome]:
        """Text pieces as the decoder emits them (cut at a stop string), then the `Outcome`."""
        account = account_prompt(self.service, prompt)
        gen, counter, stops = self._generate_kwargs(stop, kwargs)
        cutter = StopCutter(stops)
        emitted: list[str] = []
        with contextlib.closing(self.service.stream(prompt, **gen)) as pieces:
            for piece in pieces:
                if text := cutter.feed(piece):
                    emitted.append(text)
                    yield text
                if cutter.stopped:
                    break
        if tail := cutter.flush():
            emitted.append(tail)
            yield tail
        yield self._outcome("".join(emitted), account, counter, cutter.hit, gen)

    # ------------------------------------------------------------------ async
    async def _adecode(self, prompt: str, stop: list[str] | None, **kwargs: Any) -> Outcome:
        account = await asyncio.to_thread(account_prompt, self.service, prompt)
        gen, counter, stops = self._generate_kwargs(stop, kwargs)
        cutter = StopCutter(stops)
        raw = await self.service.acomplete(prompt, **gen)
        text = cutter.feed(raw) + cutter.flush()
        return self._outcome(text, account, counter, cutter.hit, gen)

    async def _adecode_stream(
        self, prompt: str, stop: list[str] | None, **kwargs: Any
    ) -> AsyncIterator[str | Outcome]:
        """Async `_decode_stream`: the decoder runs in a worker thread of `LatentService`."""
        account = await asyncio.to_thread(account_prompt, self.service, prompt)
        gen, counter, stops = self._generate_kwargs(stop, kwargs)
        cutter = StopCutter(stops)
        emitted: list[str] = []
        pieces = self.service.astream(prompt, **gen)
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
        yield self._outcome("".join(emitted), account, counter, cutter.hit, gen)
