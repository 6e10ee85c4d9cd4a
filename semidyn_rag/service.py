"""`LatentService`: the one path frameworks use between chunks of text and the decoder.

Frameworks hand an LLM only a prompt string (LlamaIndex never passes node metadata; LangChain
passes documents' page content), so a compressed chunk travels through them as a short text
*marker* naming a latent slot. This module compresses chunks (store hits first), issues markers,
and turns a prompt holding markers back into a `LatentPrompt` for the decoder. The LlamaIndex and
LangChain packages are thin translations around it and hold no model logic.

Text never acts as a slot. A marker is ``[[latent:<slot>]]`` where ``<slot>`` is an id that this
process issued when it compressed the chunk for one call, signed with a per-process secret; the
slot registry maps it to the chunk's cache key. **A slot is used once**: the LLM call that
resolves it for decoding uses it up, and from then on its marker is plain text. So only the
markers our compressor issued for the call at hand carry latents; anything else that looks like
a marker is text to the decoder: a document or question holding ``[[latent:...]]``, a marker of
another process, a cache key copied from metadata, and a marker copied from an earlier
response's source nodes or documents into a question, a chat history or a document. In a
LlamaIndex query (`expect_delivery`) a marker issued for another query is text as well; a
LangChain model call reads only the markers delivered to it (``delivered``) or, by default, those
of the newest compression call in its prompt (``newest_only``, see `LatentService.prepare`).
A marker issued here but evicted before any call read it, or a live marker cut in pieces, is an
error (`LatentDeliveryError`): a chunk's latents never vanish silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from .expansion import (
    Candidate,
    ExpansionPolicy,
    TopScorePolicy,
    check_budget,
    choose_expanded,
)
from .modeling import LatentPrompt, SemiDynamicCompressor
from .policy import CompressionPolicy
from .store import LatentStore, entry_key, text_hash
from .types import CompressedContext

MARKER_PATTERN = re.compile(r"\[\[latent:([0-9a-f]{32})\]\]")
"""The shape of a marker; only a signed slot this process issued is one (see `parse_prompt`)."""
_MARKER_START = "[[latent:"
_HEAD = re.compile(r"\[\[latent:([0-9a-f]{12,32})(?![0-9a-f]|\]\])")
_TAIL = re.compile(r"(?<![0-9a-f])([0-9a-f]{12,32})\]\]")


class LatentDeliveryError(RuntimeError):
    """A chunk's latents cannot reach the decoder as compressed; the answer would silently lack them.

    A ``RuntimeError`` on purpose: frameworks that treat a ``ValueError`` as a bad model output
    (LlamaIndex's Refine logs it and goes on) must not swallow a lost chunk.
    """


class UnknownMarkerError(LatentDeliveryError, LookupError):
    """A marker names latents that are neither in this process's cache nor in the store."""


class MalformedMarkerError(LatentDeliveryError):
    """A prompt holds a piece of a marker: something re-split the context by its own count."""


class IncompleteContextError(LatentDeliveryError):
    """A prompt holds only some of the chunks that were compressed together for one query."""


class ContextWindowError(LatentDeliveryError):
    """A prompt's decoder positions (latents included) plus the answer exceed the window."""


@dataclass(frozen=True)
class Slot:
    """One issued latent slot: the chunk it stands for and the group it was compressed in."""

    id: str
    key: str
    """The chunk's cache key (`LatentService.keys`)."""
    num_latents: int | None
    """Latent positions it expands to (``None``: look it up)."""
    group: str | None = None
    """Slots compressed together for one query share a group; ``None``: on its own."""
    group_size: int = 1

    @property
    def marker(self) -> str:
        return f"{_MARKER_START}{self.id}]]"


class _SlotRegistry:
    """Bounded registry of issued slots, signed with a per-process secret; each slot is used once.

    A slot id is ``<issue number, 10 hex><random, 6 hex><signature, 16 hex>``. Live slots (issued,
    not yet used) are held up to ``capacity``, oldest evicted first. For the last ``remembered``
    issue numbers a bitmap records which were used, so that a signed id tells apart a slot already
    read by its call (its marker is text from then on) and one evicted before any call read it
    (an error: its chunk would be lost). An id issued before that window is text.
    """

    def __init__(self, capacity: int = 65536, remembered: int = 1 << 22) -> None:
        self.capacity = capacity
        self.remembered = remembered
        self._secret = secrets.token_bytes(32)
        self._slots: OrderedDict[str, Slot] = OrderedDict()
        self._next = 0
        """Issue number of the next slot."""
        self._base = 0
        """Issue number of the bitmap's first bit (a multiple of 8)."""
        self._used = bytearray()
        self._lock = threading.Lock()

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()[:16]

    def issue(
        self, key: str, num_latents: int | None, group: str | None = None, group_size: int = 1
    ) -> Slot:
        with self._lock:
            number = self._next
            self._next += 1
            nonce = f"{number:010x}{secrets.token_hex(3)}"
            slot = Slot(nonce + self._mac(nonce), key, num_latents, group, group_size)
            self._slots[slot.id] = slot
            while len(self._slots) > self.capacity:
                self._slots.popitem(last=False)
            if self._next - self._base > self.remembered:  # forget the oldest quarter
                drop = self.remembered // 32  # bytes: a quarter of the window's bits
                del self._used[:drop]
                self._base += drop * 8
            needed = (self._next - self._base + 7) // 8
            if len(self._used) < needed:
                self._used.extend(bytes(needed - len(self._used)))
        return slot

    def signed(self, slot_id: str) -> bool:
        """True when this process issued ``slot_id`` (live, used or evicted)."""
        return hmac.compare_digest(slot_id[16:], self._mac(slot_id[:16]))

    def _bit(self, number: int) -> tuple[int, int]:
        offset = number - self._base
        return offset >> 3, 1 << (offset & 7)

    def state(self, slot_id: str) -> Slot | Literal["used", "evicted", "forgotten"]:
        """A signed id's fate: its live `Slot`, or why it no longer stands for latents."""
        number = int(slot_id[:10], 16)
        with self._lock:
            if (slot := self._slots.get(slot_id)) is not None:
                return slot
            if number < self._base:
                return "forgotten"
            index, mask = self._bit(number)
            return "used" if self._used[index] & mask else "evicted"

    def get(self, slot_id: str) -> Slot | None:
        with self._lock:
            return self._slots.get(slot_id)

    def use(self, slots: Sequence[Slot]) -> None:
        """Mark ``slots`` used, all or none; one another call used meanwhile is an error."""
        ids = list(dict.fromkeys(s.id for s in slots))
        with self._lock:
            if gone := [i for i in ids if i not in self._slots]:
                raise LatentDeliveryError(
                    f"{len(gone)} latent slot(s) of this prompt were used by another call in the "
                    "meantime (a slot is read by one LLM call only); compress the chunks again "
                    "for this call"
                )
            for slot_id in ids:
                del self._slots[slot_id]
                number = int(slot_id[:10], 16)
                if number >= self._base:
                    index, mask = self._bit(number)
                    self._used[index] |= mask

    def release(self, slots: Sequence[Slot]) -> None:
        """Undo `use` for a call that failed before the decoder read the slots."""
        with self._lock:
            for slot in {s.id: s for s in slots}.values():
                number = int(slot.id[:10], 16)
                if number < self._base:
                    continue
                index, mask = self._bit(number)
                self._used[index] &= ~mask & 0xFF
                self._slots[slot.id] = slot

    def part_of_one(self, piece: str, head: bool) -> bool:
        """True when ``piece`` starts (``head``) or ends a live slot id."""
        with self._lock:
            ids = list(self._slots)
        return any(i.startswith(piece) if head else i.endswith(piece) for i in ids)


_SLOTS = _SlotRegistry()


def marker(key: str, num_latents: int | None = None) -> str:
    """Issue a marker for the chunk with cache ``key`` (for code that builds prompts by hand).

    Each call issues a fresh slot, good for one LLM call (see `LatentService.resolve`); the
    latents are looked up (memory, then store) when a prompt holding it is resolved.
    """
    return _SLOTS.issue(key, num_latents).marker


def _issue_slots(entries: Sequence[tuple[str, int]], group: bool) -> list[Slot]:
    """Fresh slots for ``(key, num_latents)`` entries, in order. With ``group`` and more than one
    entry they share one new group id: a prompt resolved with ``whole_groups`` must hold them all."""
    group_id = secrets.token_hex(8) if group and len(entries) > 1 else None
    return [_SLOTS.issue(key, count, group_id, len(entries)) for key, count in entries]


def parse_prompt(prompt: str, *, check_fragments: bool = True) -> list[str | Slot]:
    """Split ``prompt`` into text and the live slots of its markers, in order; uses nothing.

    Only a marker this process issued whose slot no call has read yet is a slot; anything else
    stays text: marker-shaped text, a marker of another process, and a marker whose slot an
    earlier call already read (copied from a response's source nodes into a question or chat
    history, say). Raises `UnknownMarkerError` for a marker this process issued whose slot was
    evicted before any call read it, and (with ``check_fragments``) `MalformedMarkerError` when
    the text holds a cut piece of a live marker.
    """
    parts: list[str | Slot] = []
    text: list[str] = []
    last = 0
    for match in MARKER_PATTERN.finditer(prompt):
        slot_id = match.group(1)
        if not _SLOTS.signed(slot_id):
            continue
        slot = _SLOTS.state(slot_id)
        if slot == "evicted":
            raise UnknownMarkerError(
                f"marker {match.group(0)} was issued by this process but expired before any call "
                f"read it (over {_SLOTS.capacity} markers were issued after it); compress the "
                "chunk again"
            )
        if not isinstance(slot, Slot):  # already read by its own call: from now on, text
            continue
        text.append(prompt[last : match.start()])
        parts += ["".join(text), slot]
        text, last = [], match.end()
    text.append(prompt[last:])
    parts.append("".join(text))
    parts = [p for p in parts if not isinstance(p, str) or p]
    if check_fragments:
        for part in parts:
            if isinstance(part, str):
                _check_fragments(part)
    return parts


def _check_fragments(text: str) -> None:
    for match in _HEAD.finditer(text):
        if _SLOTS.part_of_one(match.group(1), head=True):
            _cut(match.group(0))
    for match in _TAIL.finditer(text):
        whole = text[: match.start()].endswith(_MARKER_START) and len(match.group(1)) == 32
        if not whole and _SLOTS.part_of_one(match.group(1), head=False):
            _cut(match.group(0))


def _cut(piece: str) -> None:
    raise MalformedMarkerError(
        f"the prompt holds {piece!r}, a piece of a latent marker: the context was re-split by a "
        "text token count (a LlamaIndex response mode packing by its tokenizer); give the LLM's "
        "prompt_helper to the synthesizer, or use SemiDynamicSynthesizer"
    )


def is_marker(text: str) -> bool:
    """True when ``text`` is exactly one live marker: issued here, and read by no call yet."""
    match = MARKER_PATTERN.fullmatch(text.strip())
    return (
        match is not None
        and _SLOTS.signed(match.group(1))
        and _SLOTS.get(match.group(1)) is not None
    )


def check_whole_groups(slots: Sequence[Slot]) -> None:
    """Raise `IncompleteContextError` unless every group touched is complete in ``slots``."""
    seen: dict[str, set[str]] = {}
    size: dict[str, int] = {}
    for slot in slots:
        if slot.group is not None:
            seen.setdefault(slot.group, set()).add(slot.id)
            size[slot.group] = slot.group_size
    for group, ids in seen.items():
        if len(ids) < size[group]:
            raise IncompleteContextError(
                f"the prompt holds {len(ids)} of the {size[group]} chunks retrieved together for "
                "one query; the others were split off into other LLM calls or truncated away "
                "(LlamaIndex's refine and accumulate modes read one chunk per call, "
                "simple_summarize truncates). Use SemiDynamicSynthesizer (as_semidyn_query_engine), "
                "or compact/tree_summarize with the LLM's prompt_helper and a context window that "
                "holds every retrieved chunk"
            )


_PENDING: contextvars.ContextVar[tuple[str, tuple[Slot, ...], tuple[str, ...]] | None] = (
    contextvars.ContextVar("semidyn_pending_chunks", default=None)
)


def expect_delivery(slots: Sequence[Slot], query: str, texts: Sequence[str] = ()) -> None:
    """Note that the query ``query`` retrieved ``slots`` and the expanded chunks ``texts``.

    The next ``whole_groups`` resolve of a prompt that contains ``query`` (every response mode
    puts the question in each prompt) must hold every one of the slots, and each text whole
    (compared without whitespace, which response modes may re-flow); in that prompt any other
    live marker is text (a marker leaked from another retrieval, typed into the question, was
    not issued for this query). A context variable, so concurrent queries keep their own; a new
    query replaces it; an empty ``query`` clears it.
    """
    texts = tuple(t for t in texts if t.strip())
    _PENDING.set((query, tuple(slots), texts) if query.strip() else None)


def _as_text(parts: list[str | Slot], keep: Callable[[Slot], bool]) -> list[str | Slot]:
    """``parts`` with every slot that ``keep`` rejects turned back into its marker text."""
    out: list[str | Slot] = []
    for part in parts:
        part = part.marker if isinstance(part, Slot) and not keep(part) else part
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        else:
            out.append(part)
    return out


def _scoped_to_pending(prompt: str, parts: list[str | Slot]) -> list[str | Slot]:
    """``parts`` with every slot not issued for the pending query turned back into its text."""
    state = _PENDING.get()
    if state is None or state[0] not in prompt:
        return parts
    ours = {s.id for s in state[1]}
    return _as_text(parts, lambda s: s.id in ours)


def _compression_call(slot: Slot) -> str:
    """Slots issued by one `LatentService.compress` call share a group; a lone one is its own."""
    return slot.group if slot.group is not None else slot.id


def _newest_call_only(parts: list[str | Slot]) -> list[str | Slot]:
    """``parts`` keeping only the slots of the most recently issued compression call among them."""
    slots = [p for p in parts if isinstance(p, Slot)]
    if not slots:
        return parts
    newest = _compression_call(max(slots, key=lambda s: int(s.id[:10], 16)))
    return _as_text(parts, lambda s: _compression_call(s) == newest)


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _check_pending(prompt: str, slots: Sequence[Slot]) -> None:
    """One verdict per query: its first prompt after `expect_delivery` must hold all chunks."""
    state = _PENDING.get()
    if state is None or state[0] not in prompt:
        return
    _PENDING.set(None)
    pending, texts = state[1], state[2]
    squeezed = _squeeze(prompt)
    lost = sum(_squeeze(t) not in squeezed for t in texts)
    if lost:
        raise IncompleteContextError(
            f"the prompt lacks {lost} of the {len(texts)} chunks expanded to text for this query "
            "(whole); they were cut, split off into other LLM calls or truncated away. Use "
            "SemiDynamicSynthesizer (as_semidyn_query_engine), or compact/tree_summarize with the "
            "LLM's prompt_helper and a context window that holds every retrieved chunk"
        )
    present = {s.id for s in slots}
    missing = sum(s.id not in present for s in pending)
    if missing:
        raise IncompleteContextError(
            f"the prompt holds {len(pending) - missing} of the {len(pending)} chunks retrieved for "
            "this query (whole); the rest were cut, split off into other LLM calls or truncated "
            "away (LlamaIndex's refine and accumulate modes read one chunk per call, "
            "simple_summarize truncates, small windows re-split). Use SemiDynamicSynthesizer "
            "(as_semidyn_query_engine), or compact/tree_summarize with the LLM's prompt_helper and "
            "a context window that holds every retrieved chunk"
        )


@dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt resolved for one LLM call whose slots are not used yet (`LatentService.prepare`)."""

    prompt: LatentPrompt
    """What the decoder reads: the text with each live marker's latents in its place."""
    slots: tuple[Slot, ...]
    """The slots expanded, in prompt order."""
    contexts: tuple[CompressedContext, ...]
    """Each slot's latents and ratio, in the same order."""
    as_text: tuple[Slot, ...] = ()
    """Live slots whose markers the prompt holds but this call reads as text (not issued for
    it: see `LatentService.prepare`'s ``delivered`` and ``newest_only``); not used."""

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.slots)


@dataclass(frozen=True)
class ChunkLatents:
    """One chunk after `LatentService.compress`: its key, latents, source and marker."""

    key: str
    context: CompressedContext
    source: Literal["encoder", "store", "memory"]
    slot: Slot

    @property
    def cached(self) -> bool:
        """True when the encoder did not run for this chunk."""
        return self.source != "encoder"

    @property
    def marker(self) -> str:
        """The text that stands for this chunk's latents in a framework's prompt."""
        return self.slot.marker


def _copied(context: CompressedContext) -> CompressedContext:
    """``context`` with its own copy of the latents."""
    return dataclasses.replace(context, latents=context.latents.clone())


@dataclass(frozen=True)
class SelectiveCompression:
    """`LatentService.compress_selectively`'s result: which chunks expand, the others' latents."""

    expanded: frozenset[int]
    """Positions of the chunks that go to the decoder as plain text."""
    chunks: tuple[ChunkLatents | None, ...]
    """Per input text, in order: its latents and marker, or ``None`` when it is expanded."""


class LatentService:
    """Compress chunks with a store-backed cache and resolve markers for the decoder.

    Latents computed in this process are also kept in a small in-memory LRU so that a query answered
    right after compression never re-reads the store (and works without one). ``scale`` and
    ``ratio`` are the default `CompressionPolicy` (an invalid one is a ``ValueError``); a store of
    another compressor is a `StoreMismatchError`.
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
        if store is not None:
            store.require_fingerprint(compressor.fingerprint)
        self.compressor = compressor
        self.store = store
        self.policy = CompressionPolicy(scale=scale, ratio=ratio)
        """The default ratio policy; a call's ``scale``/``ratio`` override it (see `policy_for`)."""
        self._memory: OrderedDict[str, CompressedContext] = OrderedDict()
        self._memory_entries = memory_entries

    @property
    def scale(self) -> float:
        """The default policy's ``scale`` (shift of the predicted log2 ratio)."""
        return self.policy.scale

    @property
    def ratio(self) -> float | None:
        """The default policy's fixed ``ratio``, or ``None`` (the selector chooses)."""
        return self.policy.ratio

    def policy_for(
        self, scale: float | None = None, ratio: float | None = None
    ) -> CompressionPolicy:
        """The policy of one call: ``scale``/``ratio`` given here replace the service's default
        (``None`` keeps it); an invalid value is a ``ValueError`` naming it."""
        return self.policy.override(scale=scale, ratio=ratio)

    # ------------------------------------------------------------------ compression
    def keys(
        self, texts: Sequence[str], scale: float | None = None, ratio: float | None = None
    ) -> list[str]:
        """Cache keys: chunk content, compressor fingerprint, and the ratio policy."""
        return self._keys(texts, self.policy_for(scale, ratio))

    def _keys(self, texts: Sequence[str], policy: CompressionPolicy) -> list[str]:
        fingerprint = self.compressor.fingerprint
        return [entry_key(t, fingerprint, policy.key) for t in texts]

    def compress(
        self,
        texts: Sequence[str],
        *,
        scale: float | None = None,
        ratio: float | None = None,
        group: bool = False,
    ) -> list[ChunkLatents]:
        """Latents for every chunk: memory and store hits first, the rest in one encoder call.

        Each chunk gets a freshly issued marker. ``group=True`` marks the chunks as retrieved
        together: a prompt resolved with ``whole_groups`` must then hold all of them. No texts:
        ``[]``.
        """
        return self._compress(texts, self.policy_for(scale, ratio), group)

    def _compress(
        self, texts: Sequence[str], policy: CompressionPolicy, group: bool
    ) -> list[ChunkLatents]:
        """`compress` under a resolved ``policy`` (the one place latents are looked up or made)."""
        if not texts:
            return []
        keys = self._keys(texts, policy)
        found: dict[str, tuple[CompressedContext, str]] = {
            k: (self._memory[k], "memory") for k in keys if k in self._memory
        }
        wanted = [k for k in dict.fromkeys(keys) if k not in found]
        if wanted and self.store is not None:
            found.update({k: (c, "store") for k, c in self.store.get_many(wanted).items()})
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
        if todo:
            fresh = self.compressor.compress(list(todo.values()), policy.scale, policy.ratio)
            if self.store is not None:
                self.store.cache_many(
                    list(zip(todo, fresh, strict=True)),
                    text_hashes={k: text_hash(t) for k, t in todo.items()},
                    policy=policy.key,
                )
                # serve what the store serves: an answer must not depend on where latents came from
                fresh = [self._as_stored(c) for c in fresh]
            found.update({k: (c, "encoder") for k, c in zip(todo, fresh, strict=True)})
        for key in keys:
            self._remember(key, found[key][0])
        slots = _issue_slots([(k, found[k][0].num_latents) for k in keys], group)
        return [ChunkLatents(k, *found[k], slot) for k, slot in zip(keys, slots, strict=True)]

    async def acompress(
        self,
        texts: Sequence[str],
        *,
        scale: float | None = None,
        ratio: float | None = None,
        group: bool = False,
    ) -> list[ChunkLatents]:
        return await asyncio.to_thread(self.compress, texts, scale=scale, ratio=ratio, group=group)

    def regroup(self, chunks: Sequence[ChunkLatents]) -> list[ChunkLatents]:
        """The same chunks under freshly issued slots that form one group (see `compress`)."""
        slots = _issue_slots([(c.key, c.context.num_latents) for c in chunks], group=True)
        return [dataclasses.replace(c, slot=s) for c, s in zip(chunks, slots, strict=True)]

    def compress_selectively(
        self,
        texts: Sequence[str],
        *,
        query: str,
        expand_top_k: int,
        scores: Sequence[float | None] | None = None,
        policy: ExpansionPolicy | None = None,
        compression: CompressionPolicy | None = None,
        group: bool = False,
    ) -> SelectiveCompression:
        """Compress the retrieved ``texts`` except the ones ``policy`` expands to plain text.

        ``expand_top_k`` is the budget (`semidyn_rag.expansion.choose_expanded`: 0 expands
        nothing, a budget of at least ``len(texts)`` expands all, negative is a ``ValueError``);
        ``policy`` defaults to `TopScorePolicy` over ``scores`` (retrieval order where they tie or
        are ``None``). A policy with ``needs_contexts`` reads every chunk's latents first (store
        and memory hits skip the encoder); otherwise only the chunks left compressed are
        compressed. ``compression`` is the ratio policy of the call, already resolved (a
        framework component's `policy_for` and its per-call override); ``None``: the service's
        default `policy`. With ``group`` the compressed chunks form one group, as in `compress`.
        """
        budget = check_budget(expand_top_k)
        policy = TopScorePolicy() if policy is None else policy
        compression = self.policy if compression is None else compression
        if scores is not None and len(scores) != len(texts):
            raise ValueError(f"{len(scores)} scores for {len(texts)} texts")
        n = len(texts)
        every: list[ChunkLatents] | None = None
        if policy.needs_contexts and 0 < budget < n:
            every = self._compress(texts, compression, group=False)
        candidates = [
            Candidate(
                text=t,
                score=None if scores is None else scores[i],
                # a copy: a policy writing into it must not reach the memory cache or the prompt
                context=None if every is None else _copied(every[i].context),
            )
            for i, t in enumerate(texts)
        ]
        expanded = choose_expanded(policy, query, candidates, budget)
        keep = [i for i in range(n) if i not in expanded]
        if every is not None:
            kept = [every[i] for i in keep]
            compressed = self.regroup(kept) if group else kept
        else:
            compressed = self._compress([texts[i] for i in keep], compression, group)
        chunks: list[ChunkLatents | None] = [None] * n
        for i, chunk in zip(keep, compressed, strict=True):
            chunks[i] = chunk
        return SelectiveCompression(expanded, tuple(chunks))

    async def acompress_selectively(
        self,
        texts: Sequence[str],
        *,
        query: str,
        expand_top_k: int,
        scores: Sequence[float | None] | None = None,
        policy: ExpansionPolicy | None = None,
        compression: CompressionPolicy | None = None,
        group: bool = False,
    ) -> SelectiveCompression:
        """Async `compress_selectively`: the policy and the encoder run in a worker thread."""
        return await asyncio.to_thread(
            functools.partial(
                self.compress_selectively,
                texts,
                query=query,
                expand_top_k=expand_top_k,
                scores=scores,
                policy=policy,
                compression=compression,
                group=group,
            )
        )

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
                "a marker names latents that were never compressed here nor stored (keys "
                f"{', '.join(dict.fromkeys(unknown))}); compress the chunk with this compressor"
            )
        return out

    def slots(self, prompt: str) -> list[Slot]:
        """The live slots of the markers in ``prompt``, in order (as `parse_prompt`; uses none)."""
        return [p for p in parse_prompt(prompt) if isinstance(p, Slot)]

    def prepare(
        self,
        prompt: str,
        *,
        whole_groups: bool = False,
        delivered: Collection[str] | None = None,
        newest_only: bool = False,
    ) -> ResolvedPrompt:
        """Resolve ``prompt`` for one LLM call without using its slots yet (see `resolve`).

        Checks everything `resolve` checks and looks the latents up; the caller then runs its
        own checks (a context window, say) and hands the result to `complete` or `stream`, which
        use the slots, or to `use`.

        Which live markers this call reads (the others are text, listed in ``as_text``):
        ``delivered`` (slot ids) names them exactly; otherwise ``newest_only`` keeps only those
        of the most recently issued compression call among them (one `compress` call; a marker
        of an earlier call, pasted into a question or chat history, is text).

        Missing chunks (``whole_groups``) are checked before cut marker pieces: a prompt that
        lost some of its query's chunks is an `IncompleteContextError` wherever a re-split cut.
        """
        parts = parse_prompt(prompt, check_fragments=False)
        live = [p for p in parts if isinstance(p, Slot)]
        if delivered is not None:
            parts = _as_text(parts, lambda s: s.id in delivered)
        elif newest_only:
            parts = _newest_call_only(parts)
        if whole_groups:
            parts = _scoped_to_pending(prompt, parts)
        slots = tuple(p for p in parts if isinstance(p, Slot))
        if whole_groups:
            _check_pending(prompt, slots)
            check_whole_groups(slots)
        for part in parts:
            if isinstance(part, str):
                _check_fragments(part)
        kept = {s.id for s in slots}
        as_text = tuple({s.id: s for s in live if s.id not in kept}.values())
        found = self.lookup([s.key for s in slots]) if slots else {}
        resolved = LatentPrompt.from_parts(
            p if isinstance(p, str) else found[p.key].latents for p in parts
        )
        return ResolvedPrompt(resolved, slots, tuple(found[s.key] for s in slots), as_text)

    def use(self, *prepared: ResolvedPrompt) -> None:
        """Use the slots of ``prepared`` for the one LLM call about to decode them.

        Their markers are text to every later call. Several prompts of one call (a batch) use
        their slots together, so a slot they share serves all of them. Raises
        `LatentDeliveryError` when another call used one of the slots since `prepare`.
        """
        _SLOTS.use([s for p in prepared for s in p.slots])

    def release(self, *prepared: ResolvedPrompt) -> None:
        """Give back the slots of a call that failed before the decoder read them."""
        _SLOTS.release([s for p in prepared for s in p.slots])

    def resolve(self, prompt: str, *, whole_groups: bool = False, use: bool = True) -> LatentPrompt:
        """The decoder prompt: each live marker becomes its latents, the rest stays text.

        **A slot carries latents into one LLM call only.** Resolving a prompt for decoding uses
        the slots it expands; their markers are plain text to every later call (a marker copied
        from a response's source nodes into a question or a chat history is text). ``use=False``
        only looks (inspection, counting); `parse_prompt`, `slots` and token counting never use.

        ``whole_groups`` also requires every chunk of each group the prompt touches (see
        `compress`) and, in a query that called `expect_delivery`, every chunk it retrieved
        (any other live marker is text there). Raises a `LatentDeliveryError` as `parse_prompt`
        and `check_whole_groups` do, or when a slot's latents are in neither memory nor the store.
        """
        prepared = self.prepare(prompt, whole_groups=whole_groups)
        if use:
            self.use(prepared)
        return prepared.prompt

    def _start(
        self, prompt: str | LatentPrompt | ResolvedPrompt, whole_groups: bool
    ) -> tuple[LatentPrompt, ResolvedPrompt | None]:
        if isinstance(prompt, LatentPrompt):
            return prompt, None
        prepared = (
            prompt
            if isinstance(prompt, ResolvedPrompt)
            else self.prepare(prompt, whole_groups=whole_groups)
        )
        self.use(prepared)
        return prepared.prompt, prepared

    def complete(
        self,
        prompt: str | LatentPrompt | ResolvedPrompt,
        *,
        whole_groups: bool = False,
        **generate_kwargs: object,
    ) -> str:
        """The decoder's answer to ``prompt``: a framework's string (resolved and used here), a
        `prepare` result (used here), or an already resolved `LatentPrompt`.

        A decoder error gives the slots back (a retry of the same prompt still reads them).
        """
        resolved, prepared = self._start(prompt, whole_groups)
        try:
            return self.compressor.complete([resolved], **generate_kwargs)[0]
        except BaseException:
            if prepared is not None:
                self.release(prepared)
            raise

    def stream(
        self,
        prompt: str | LatentPrompt | ResolvedPrompt,
        *,
        whole_groups: bool = False,
        **generate_kwargs: object,
    ) -> Iterator[str]:
        """Decoder text pieces as they are produced (the slots are used before the first)."""
        resolved, _ = self._start(prompt, whole_groups)
        return self.compressor.stream(resolved, **generate_kwargs)

    async def acomplete(
        self,
        prompt: str | LatentPrompt | ResolvedPrompt,
        *,
        whole_groups: bool = False,
        **generate_kwargs: object,
    ) -> str:
        return await asyncio.to_thread(
            self.complete, prompt, whole_groups=whole_groups, **generate_kwargs
        )

    async def astream(
        self,
        prompt: str | LatentPrompt | ResolvedPrompt,
        *,
        whole_groups: bool = False,
        **generate_kwargs: object,
    ) -> AsyncIterator[str]:
        """Async token stream: the decoder runs in a worker thread, pieces come back as they land."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        done = object()
        stop = threading.Event()

        def produce() -> None:
            try:
                # closing the sync stream cancels the decoder and releases its lock
                pieces = self.stream(prompt, whole_groups=whole_groups, **generate_kwargs)
                with contextlib.closing(pieces):
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
