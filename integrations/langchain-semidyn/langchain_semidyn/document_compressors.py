"""`SemiDynamicDocumentCompressor`: retrieved documents in, latent markers out.

LangChain hands an LLM only strings, so a compressed document travels as a short marker
(``[[latent:<key>]]``) in ``page_content``; `SemiDynamicLLM` / `ChatSemiDynamic` turn it back into
the chunk's latents. Compression is query-independent (the encoder reads the chunk alone), which is
what lets a corpus be compressed once, offline, into a store shared with the LlamaIndex integration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict
from semidyn_rag.service import ChunkLatents, LatentService, is_marker

logger = logging.getLogger(__name__)

PREFIX = "semidyn_"
"""Every metadata key this compressor adds starts with it (flat keys suit vector-store filters)."""


class SemiDynamicDocumentCompressor(BaseDocumentCompressor):
    """Compress documents through a store-backed `LatentService`; return marker documents.

    All documents of one call go to the encoder together (store and memory hits skip it). Each
    returned document keeps its id and metadata and adds ``semidyn_key``, ``semidyn_ratio``,
    ``semidyn_segment_ratios``, ``semidyn_num_latents``, ``semidyn_original_tokens``,
    ``semidyn_source`` (``encoder``, ``store`` or ``memory``), ``semidyn_scale``, the head's
    ``semidyn_predicted_y`` when it ran, and ``semidyn_original_text`` unless turned off.

    Works as ``base_compressor`` of ``ContextualCompressionRetriever`` or on its own.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    service: LatentService
    """Share it with the LLM so that answers right after compression never re-read the store."""
    scale: float | None = None
    """Shift of the predicted log2 ratio (higher compresses more); ``None``: the service's."""
    ratio: float | None = None
    """A fixed trained ratio instead of the selector's choice (multi-ratio compressors)."""
    keep_original_text: bool = True
    """Keep the chunk text in metadata for citations; it never reaches the prompt."""

    def with_scale(self, scale: float | None) -> SemiDynamicDocumentCompressor:
        """A copy with another ``scale`` (e.g. for one ``ContextualCompressionRetriever``)."""
        return self.model_copy(update={"scale": scale})

    def _settings(self, scale: float | None, ratio: float | None) -> tuple[float, float | None]:
        ratio = self.ratio if ratio is None else ratio
        ratio = self.service.ratio if ratio is None else ratio
        scale = self.scale if scale is None else scale
        return (self.service.scale if scale is None else scale), ratio

    def _split(self, documents: Sequence[Document]) -> tuple[list[Document], list[Document]]:
        """Documents to compress; empty ones and ones that are already markers are set aside."""
        todo, skipped = [], []
        for doc in documents:
            text = doc.page_content
            (todo if text.strip() and not is_marker(text) else skipped).append(doc)
        return todo, skipped

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
        *,
        scale: float | None = None,
        ratio: float | None = None,
    ) -> list[Document]:
        """Marker documents in the input order; ``scale``/``ratio`` override the fields.

        ``query`` is unused: compression reads each chunk alone, so cached latents serve any query.
        Empty documents are dropped; documents that already are markers pass through unchanged.
        """
        todo, _ = self._split(documents)
        used_scale, used_ratio = self._settings(scale, ratio)
        chunks = (
            self.service.compress(
                [d.page_content for d in todo], scale=used_scale, ratio=used_ratio
            )
            if todo
            else []
        )
        return self._merge(documents, todo, chunks, used_scale, used_ratio)

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
        *,
        scale: float | None = None,
        ratio: float | None = None,
    ) -> list[Document]:
        """Async `compress_documents`: the encoder runs in a worker thread."""
        todo, _ = self._split(documents)
        used_scale, used_ratio = self._settings(scale, ratio)
        chunks = (
            await self.service.acompress(
                [d.page_content for d in todo], scale=used_scale, ratio=used_ratio
            )
            if todo
            else []
        )
        return self._merge(documents, todo, chunks, used_scale, used_ratio)

    def _merge(
        self,
        documents: Sequence[Document],
        todo: list[Document],
        chunks: list[ChunkLatents],
        scale: float,
        ratio: float | None,
    ) -> list[Document]:
        by_id = {id(doc): chunk for doc, chunk in zip(todo, chunks, strict=True)}
        out: list[Document] = []
        for doc in documents:
            chunk = by_id.get(id(doc))
            if chunk is not None:
                out.append(self._document(doc, chunk, scale, ratio))
            elif doc.page_content.strip():
                out.append(doc)  # already a marker
        if dropped := len(documents) - len(out):
            logger.debug("dropped %d empty document(s)", dropped)
        encoded = sum(not c.cached for c in chunks)
        logger.debug("compressed %d document(s), %d through the encoder", len(chunks), encoded)
        return out

    def _document(
        self, doc: Document, chunk: ChunkLatents, scale: float, ratio: float | None
    ) -> Document:
        ctx = chunk.context
        extra: dict[str, Any] = {
            "key": chunk.key,
            "ratio": ctx.ratio,
            "segment_ratios": list(ctx.segment_ratios),
            "num_latents": ctx.num_latents,
            "original_tokens": ctx.num_tokens,
            "source": chunk.source,
            "scale": None if ratio is not None else scale,
        }
        if math.isfinite(ctx.predicted_y):
            extra["predicted_y"] = ctx.predicted_y
        if self.keep_original_text:
            extra["original_text"] = doc.page_content
        metadata = {**doc.metadata, **{PREFIX + k: v for k, v in extra.items()}}
        return Document(page_content=chunk.marker, metadata=metadata, id=doc.id)
