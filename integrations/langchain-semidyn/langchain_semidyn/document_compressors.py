"""`SemiDynamicDocumentCompressor`: retrieved documents in, latent markers out.

LangChain hands an LLM only strings, so a compressed document travels as a short marker
(``[[latent:<slot>]]``, a slot issued for this call) in ``page_content``; `SemiDynamicLLM` /
`ChatSemiDynamic` turn it back into the chunk's latents, once: the LLM call that reads a slot uses
it up, and its marker is plain text afterwards. A model call reads the markers `format_docs`
formatted into its prompt (or the documents handed to it as ``latent_documents``); others are text.
Compression is query-independent (the encoder reads the chunk alone), which is what lets a corpus
be compressed once, offline, into a store shared with the LlamaIndex integration.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field
from semidyn_rag.expansion import ExpansionPolicy, TopScorePolicy
from semidyn_rag.policy import CompressionPolicy
from semidyn_rag.prompting import METADATA_PREFIX, chunk_metadata, expanded_metadata
from semidyn_rag.service import ChunkLatents, LatentService, SelectiveCompression

from ._issued import register

logger = logging.getLogger(__name__)

PREFIX = METADATA_PREFIX
"""Every metadata key this compressor adds starts with it (flat keys suit vector-store filters)."""


class SemiDynamicDocumentCompressor(BaseDocumentCompressor):
    """Compress documents through a store-backed `LatentService`; return marker documents.

    All documents of one call go to the encoder together (store and memory hits skip it). Each
    returned document keeps its id and metadata and adds ``semidyn_key``, ``semidyn_ratio``,
    ``semidyn_segment_ratios``, ``semidyn_num_latents``, ``semidyn_original_tokens``,
    ``semidyn_source`` (``encoder``, ``store`` or ``memory``), ``semidyn_scale``, the head's
    ``semidyn_predicted_y`` when it ran, and ``semidyn_original_text`` unless turned off.

    Works as ``base_compressor`` of ``ContextualCompressionRetriever`` or on its own.

    **Selective expansion.** With ``expand_top_k = k`` (or ``expand_top_k=`` per call, or an
    ``"expand_top_k"`` key in `compression_step`'s input) the ``k`` documents chosen by
    ``expansion_policy`` keep their ``page_content`` and the rest become markers; the order never
    changes. The default `TopScorePolicy` ranks by ``metadata[score_key]`` (a reranker's
    ``relevance_score`` by default); where scores tie or are absent, retrieval order (so plain
    vector-store retrievers, which return the best first, expand their first ``k``). Every
    returned document gets ``semidyn_expanded``; expanded ones carry no latent metadata. ``k``
    at least the number of documents expands all; negative ``k`` is an error.
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
    expand_top_k: int = Field(default=0, ge=0, strict=True)  # as `check_budget`: no bool, "1"
    """Documents sent as plain text per query (chosen by ``expansion_policy``); 0: none."""
    expansion_policy: ExpansionPolicy = Field(default_factory=TopScorePolicy)
    """Chooses the documents to expand (`semidyn_rag.expansion`)."""
    score_key: str = "relevance_score"
    """Metadata key holding a document's retrieval score for `TopScorePolicy` (absent: order)."""

    def with_scale(self, scale: float | None) -> SemiDynamicDocumentCompressor:
        """A copy with another ``scale`` (e.g. for one ``ContextualCompressionRetriever``)."""
        return self.model_copy(update={"scale": scale})

    def with_expansion(
        self, expand_top_k: int, policy: ExpansionPolicy | None = None
    ) -> SemiDynamicDocumentCompressor:
        """A copy that expands ``expand_top_k`` documents (with ``policy``, else the same one)."""
        update: dict[str, Any] = {"expand_top_k": expand_top_k}
        if policy is not None:
            update["expansion_policy"] = policy
        return type(self).model_validate({**dict(self), **update})

    def _scores(self, documents: Sequence[Document]) -> list[float | None]:
        scores: list[float | None] = []
        for doc in documents:
            value = doc.metadata.get(self.score_key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real)
            ):  # NumPy scalars are Real: rerankers return them (FlashrankRerank's float32)
                raise ValueError(
                    f"document {doc.id or ''!s} has metadata[{self.score_key!r}] = {value!r}, "
                    "not a number; set score_key to the key of the retrieval score"
                )
            scores.append(None if value is None else float(value))
        return scores

    def _plan(
        self,
        documents: Sequence[Document],
        query: str,
        scale: float | None,
        ratio: float | None,
        expand_top_k: int | None,
    ) -> tuple[list[Document], CompressionPolicy, dict[str, Any]]:
        """One call, before the encoder: the documents to compress, its ratio policy, and the
        keyword arguments of the service's ``compress_selectively`` (``texts`` included).

        Every document with text is compressed; empty ones are set aside. A document whose text
        is a marker is compressed like any text: a marker carries latents only into the LLM call
        it was issued for, never through a document. The ratio policy is the call's
        ``scale``/``ratio``, then the fields, then the service's default (``None`` keeps the
        wider value); invalid values are a ``ValueError``.
        """
        todo = [doc for doc in documents if doc.page_content.strip()]
        compression = self.service.policy_for(self.scale, self.ratio).override(scale, ratio)
        args = {
            "texts": [doc.page_content for doc in todo],
            "query": query,
            "expand_top_k": self.expand_top_k if expand_top_k is None else expand_top_k,
            "scores": self._scores(todo),
            "policy": self.expansion_policy,
            "compression": compression,
            "group": True,  # one compression call: what a model call reads by default
        }
        return todo, compression, args

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
        *,
        scale: float | None = None,
        ratio: float | None = None,
        expand_top_k: int | None = None,
    ) -> list[Document]:
        """Marker (and expanded) documents in the input order; keyword arguments override fields.

        Compression reads each chunk alone, so cached latents serve any query; ``query`` only goes
        to the expansion policy. Empty documents are dropped; every other document is compressed,
        one whose text is a marker included (text never stands for latents). A negative
        ``expand_top_k`` is a ``ValueError``.
        """
        todo, compression, args = self._plan(documents, query, scale, ratio, expand_top_k)
        selection = self.service.compress_selectively(**args)
        return self._merge(documents, todo, selection, compression)

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
        *,
        scale: float | None = None,
        ratio: float | None = None,
        expand_top_k: int | None = None,
    ) -> list[Document]:
        """Async `compress_documents`: the encoder runs in a worker thread."""
        todo, compression, args = self._plan(documents, query, scale, ratio, expand_top_k)
        selection = await self.service.acompress_selectively(**args)
        return self._merge(documents, todo, selection, compression)

    def _merge(
        self,
        documents: Sequence[Document],
        todo: list[Document],
        selection: SelectiveCompression,
        compression: CompressionPolicy,
    ) -> list[Document]:
        """One document per entry of ``todo`` (the input order, empty documents left out); by
        position, as one Document object may come twice and each occurrence is its own chunk."""
        out = [
            self._expanded(doc) if chunk is None else self._document(doc, chunk, compression)
            for doc, chunk in zip(todo, selection.chunks, strict=True)
        ]
        if dropped := len(documents) - len(out):
            logger.debug("dropped %d empty document(s)", dropped)
        chunks = [c for c in selection.chunks if c is not None]
        encoded = sum(not c.cached for c in chunks)
        logger.debug("compressed %d document(s), %d through the encoder", len(chunks), encoded)
        return out

    def _expanded(self, doc: Document) -> Document:
        """``doc`` with its text kept for the decoder, marked as expanded."""
        extra = expanded_metadata(doc.page_content if self.keep_original_text else None)
        return Document(
            page_content=doc.page_content, metadata={**doc.metadata, **extra}, id=doc.id
        )

    def _document(
        self, doc: Document, chunk: ChunkLatents, compression: CompressionPolicy
    ) -> Document:
        extra = chunk_metadata(
            chunk,
            compression=compression,
            original_text=doc.page_content if self.keep_original_text else None,
        )
        metadata = {**doc.metadata, **extra}
        compressed = Document(page_content=chunk.marker, metadata=metadata, id=doc.id)
        register([compressed])  # what `format_docs` may arm: this object, not a copy of it
        return compressed
