"""`LatentService`: the one path frameworks use between chunks of text and the decoder.

Frameworks hand an LLM only a prompt string (LlamaIndex never passes node metadata; LangChain
passes documents' page content), so a compressed chunk travels through them as a short text
*marker* naming its cached latents. This module compresses chunks (store hits first), hands out
markers, and turns a prompt full of markers back into a `LatentPrompt` for the decoder. The
LlamaIndex and LangChain packages are thin translations around it and hold no model logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from .modeling import PLACEHOLDER, LatentPrompt, SemiDynamicCompressor
from .store import LatentStore, StoreMismatchError, entry_key, policy_key, text_hash
from .types import CompressedContext

MARKER_PATTERN = re.compile(r"\[\[latent:([0-9a-f]{64})\]\]")


def marker(key: str) -> str:
    """The text that stands for one chunk's latents inside a framework's prompt."""
    return f"[[latent:{key}]]"


class UnknownMarkerError(LookupError):
    """A prompt names latents that are neither in this process's cache nor in the store.

    A ``LookupError`` rather than a ``KeyError``: the latter would print its message quoted.
    """


@dataclass(frozen=True)
class ChunkLatents:
    """One chunk after `LatentService.compress`: its key, latents and where they came from."""

    key: str
    context: CompressedContext
    source: Literal["encoder", "store", "memory"]

    @property
    def cached(self) -> bool:
        """True when the encoder did not run for this chunk."""
        return self.source != "encoder"

    @property
    def marker(self) -> str:
        return marker(self.key)


class LatentService:
    """Compress chunks with a store-backed cache and resolve markers for the decoder.

    Latents computed in this process are also kept in a small in-memory LRU so that a query answered
    right after compression never re-reads the store (and works without one).
    """

    def __init__(
        self,
        compressor: SemiDynamicCompressor,
        store: LatentStore | None = None,
        *,
        scale: float = 0.0,
        ratio: float | None = None,
        memory_entries: int = 4096,
    ) -> None:
        if store is not None and store.fingerprint != compressor.fingerprint:
            raise StoreMismatchError(
                f"store {store.path} holds latents of compressor {store.fingerprint}, not of "
                f"this one ({compressor.fingerprint}); open the store with this compressor's "
                "fingerprint or use another path"
            )
        self.compressor = compressor
        self.store = store
        self.scale = scale
        self.ratio = ratio
        self._memory: OrderedDict[str, CompressedContext] = OrderedDict()
        self._memory_entries = memory_entries

    # ------------------------------------------------------------------ compression
    def keys(
        self, texts: Sequence[str], scale: float | None = None, ratio: float | None = None
    ) -> list[str]:
        """Cache keys: chunk content, compressor fingerprint, and the ratio policy."""
        policy = self._policy(scale, ratio)
        fingerprint = self.compressor.fingerprint
        return [entry_key(t, fingerprint, policy) for t in texts]

    def _policy(self, scale: float | None, ratio: float | None) -> str:
        ratio = self.ratio if ratio is None else ratio
        return policy_key(None if ratio is not None else self._scale(scale), ratio)

    def _scale(self, scale: float | None) -> float:
        return self.scale if scale is None else scale

    def compress(
        self, texts: Sequence[str], *, scale: float | None = None, ratio: float | None = None
    ) -> list[ChunkLatents]:
        """Latents for every chunk: memory and store hits first, the rest in one encoder call."""
        keys = self.keys(texts, scale, ratio)
        found: dict[str, tuple[CompressedContext, str]] = {
            k: (self._memory[k], "memory") for k in keys if k in self._memory
        }
        wanted = [k for k in dict.fromkeys(keys) if k not in found]
        if wanted and self.store is not None:
            found.update({k: (c, "store") for k, c in self.store.get_many(wanted).items()})
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
        if todo:
            fresh = self.compressor.compress(
                list(todo.values()), self._scale(scale), self.ratio if ratio is None else ratio
            )
            if self.store is not None:
                self.store.put_many(
                    list(zip(todo, fresh, strict=True)),
                    text_hashes={k: text_hash(t) for k, t in todo.items()},
                    policy=self._policy(scale, ratio),
                )
                # serve what the store serves: an answer must not depend on where latents came from
                fresh = [self._as_stored(c) for c in fresh]
            found.update({k: (c, "encoder") for k, c in zip(todo, fresh, strict=True)})
        for key in keys:
            self._remember(key, found[key][0])
        return [ChunkLatents(k, *found[k]) for k in keys]

    async def acompress(
        self, texts: Sequence[str], *, scale: float | None = None, ratio: float | None = None
    ) -> list[ChunkLatents]:
        return await asyncio.to_thread(self.compress, texts, scale=scale, ratio=ratio)

    def _as_stored(self, context: CompressedContext) -> CompressedContext:
        latents = context.latents.to(self.store.dtype).to(context.latents.dtype)
        return dataclasses.replace(context, latents=latents)

    def _remember(self, key: str, context: CompressedContext) -> None:
        self._memory[key] = context
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    # ------------------------------------------------------------------ decoding
    def lookup(self, keys: Sequence[str]) -> dict[str, CompressedContext]:
        """Latents for the given keys from memory, then the store; unknown keys are an error."""
        out = {k: self._memory[k] for k in keys if k in self._memory}
        missing = [k for k in keys if k not in out]
        if missing and self.store is not None:
            out.update(self.store.get_many(missing))
        unknown = [k for k in keys if k not in out]
        if unknown:
            raise UnknownMarkerError(
                f"prompt names latents that were never compressed here nor stored: "
                f"{', '.join(marker(k) for k in unknown)}"
            )
        return out

    def resolve(self, prompt: str) -> LatentPrompt:
        """Replace every marker by the placeholder of its latents (plain text stays plain)."""
        keys = MARKER_PATTERN.findall(prompt)
        contexts = self.lookup(keys) if keys else {}
        text = MARKER_PATTERN.sub(PLACEHOLDER, prompt)
        return LatentPrompt(text, [contexts[k].latents for k in keys])

    def complete(self, prompt: str, **generate_kwargs: object) -> str:
        return self.compressor.complete([self.resolve(prompt)], **generate_kwargs)[0]

    def stream(self, prompt: str, **generate_kwargs: object) -> Iterator[str]:
        return self.compressor.stream(self.resolve(prompt), **generate_kwargs)

    async def acomplete(self, prompt: str, **generate_kwargs: object) -> str:
        return await asyncio.to_thread(self.complete, prompt, **generate_kwargs)

    async def astream(self, prompt: str, **generate_kwargs: object) -> AsyncIterator[str]:
        """Async token stream: the decoder runs in a worker thread, pieces come back as they land."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                # closing the sync stream cancels the decoder and releases its lock
                with contextlib.closing(self.stream(prompt, **generate_kwargs)) as pieces:
                    for piece in pieces:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        if stop.is_set():
                            break
            except BaseException as exc:  # an unknown marker, a decoder error: raised below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:  # a consumer that stops early (or is cancelled) stops the decoder too
            stop.set()
            await worker

    def qa_template(self, context_slot: str, question_slot: str) -> str:
        """The compressor's training prompt with a framework's slot names (e.g. LlamaIndex's)."""
        return self.compressor.config.prompt_template.format(
            context=context_slot, question=question_slot
        )
