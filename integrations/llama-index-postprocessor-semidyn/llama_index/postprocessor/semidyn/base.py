"""`SemiDynamicNodePostprocessor`: retrieved nodes in, latent markers out.

LlamaIndex hands an LLM a prompt string and never node metadata, so a compressed node travels as a
short marker (``[[latent:<slot>]]``, a slot this process issued for this query) in its text;
`SemiDynamicLLM` turns it back into the chunk's latent span, once: the LLM call that reads a slot
uses it up. A node whose own text is or holds a marker is compressed like any text: text never
stands for latents. Compression reads each chunk alone (it does not depend on the query), which
is what lets a corpus be compressed once, offline, into a `LatentStore` that every later query
reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle
from semidyn_rag.expansion import ExpansionPolicy, TopScorePolicy, check_budget
from semidyn_rag.policy import CompressionPolicy
from semidyn_rag.precompress import Chunk, PrecompressConfig, PrecompressReport, precompress
from semidyn_rag.prompting import METADATA_PREFIX, chunk_metadata, expanded_metadata
from semidyn_rag.service import (
    ChunkLatents,
    LatentService,
    SelectiveCompression,
    expect_delivery,
)

logger = logging.getLogger(__name__)

PREFIX = METADATA_PREFIX
"""Every metadata key the postprocessor adds starts with it (flat keys suit metadata filters)."""
KEY = PREFIX + "key"
RATIO = PREFIX + "ratio"
SEGMENT_RATIOS = PREFIX + "segment_ratios"
NUM_LATENTS = PREFIX + "num_latents"
ORIGINAL_TOKENS = PREFIX + "original_tokens"
SOURCE = PREFIX + "source"
"""``encoder`` (compressed for this query), ``store`` (precompressed) or ``memory`` (this process)."""
SCALE = PREFIX + "scale"
PREDICTED_Y = PREFIX + "predicted_y"
ORIGINAL_TEXT = PREFIX + "original_text"
EXPANDED = PREFIX + "expanded"
"""``True``: the node reaches the LLM as its plain text (expansion); ``False``: as latents."""

_scale_override: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "semidyn_scale", default=None
)


@contextlib.contextmanager
def compression_scale(scale: float | None) -> Iterator[None]:
    """Use ``scale`` for the queries run inside the block, without rebuilding the query engine.

    ``with compression_scale(1.0): engine.query(q)`` compresses harder for that query only. It is a
    context variable, so it follows ``aquery`` into its tasks and threads, and concurrent queries
    in other tasks keep their own value. ``None`` falls back to the postprocessor's ``scale``.
    """
    token = _scale_override.set(scale)
    try:
        yield
    finally:
        _scale_override.reset(token)


_expand_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "semidyn_expand_top_k", default=None
)


@contextlib.contextmanager
def expansion_top_k(k: int | None) -> Iterator[None]:
    """Expand ``k`` nodes to plain text for the queries run inside the block.

    ``with expansion_top_k(2): engine.query(q)`` sends the two best-scored nodes as text and the
    rest as latents, for that query only; like :func:`compression_scale` it is a context
    variable (it follows ``aquery``; concurrent queries keep their own). ``None`` falls back to
    the postprocessor's ``expand_top_k``. A negative ``k`` is a ``ValueError`` here.
    """
    token = _expand_override.set(None if k is None else check_budget(k))
    try:
        yield
    finally:
        _expand_override.reset(token)


class SemiDynamicNodePostprocessor(BaseNodePostprocessor):
    """Replace each retrieved node's text by the marker of its latents (store hits first).

    All nodes of one query go to the encoder in one call; nodes already in the store or in the
    service's memory skip it. Each returned node keeps its id, score, relationships and metadata,
    and gains ``semidyn_key``, ``semidyn_ratio``, ``semidyn_segment_ratios``,
    ``semidyn_num_latents``, ``semidyn_original_tokens``, ``semidyn_source`` (``encoder``,
    ``store`` or ``memory``), ``semidyn_scale``, the head's ``semidyn_predicted_y`` when it ran,
    and ``semidyn_original_text`` unless turned off (for citations).

    Every metadata key is excluded from what the LLM sees, so the node's LLM text is the marker
    alone: the decoder was trained on contexts that are nothing but latents. To let metadata
    (a title, a file name) inform the answer, set ``metadata_mode=MetadataMode.LLM``: the encoder
    then compresses the text the LLM would have read, metadata included. Precompress a corpus
    with :meth:`precompress`: it stores exactly the texts and ratio policy this postprocessor
    looks up, so every later query is a store hit.

    The compression ``scale`` (higher compresses more) comes, in order, from
    :func:`compression_scale` around the query, the ``scale`` field, the service's default.

    **Selective expansion.** With ``expand_top_k = k`` (or :func:`expansion_top_k` around a query)
    the ``k`` nodes chosen by ``expansion_policy`` (default `TopScorePolicy`: the highest retrieval
    scores; ties and missing scores in retrieval order) keep their text, the others become
    markers; the order of the nodes never changes. Every node with text gets
    ``semidyn_expanded`` (an empty node passes unchanged and takes no budget); an expanded node's LLM text is exactly the text that would have been compressed (``node_text``)
    and it carries no latent metadata. ``k`` at least the number of nodes expands every node;
    a negative ``k`` is a validation error. `SemiDynamicLLM` checks that each expanded text
    reaches the prompt whole, as it checks the markers.
    """

    scale: float | None = Field(
        default=None, description="Shift of the predicted log2 ratio; None: the service's."
    )
    ratio: float | None = Field(
        default=None, description="A fixed trained ratio instead of the selector's choice."
    )
    metadata_mode: MetadataMode = Field(
        default=MetadataMode.NONE,
        description="Which text of a node is compressed: NONE (its text) or LLM (with metadata).",
    )
    keep_original_text: bool = Field(
        default=True, description="Keep the chunk text in metadata; it never reaches the prompt."
    )
    expand_top_k: int = Field(
        default=0,
        ge=0,
        strict=True,  # as `check_budget` per query: True or "1" is an error, not 1
        description="Nodes sent as plain text per query (the policy's choice).",
    )
    _service: LatentService = PrivateAttr()
    _policy_obj: ExpansionPolicy = PrivateAttr()

    def __init__(
        self,
        service: LatentService,
        *,
        expansion_policy: ExpansionPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._service = service
        policy = TopScorePolicy() if expansion_policy is None else expansion_policy
        if not isinstance(policy, ExpansionPolicy):
            raise TypeError(
                f"expansion_policy must have needs_contexts and choose(query, candidates, k); "
                f"got {policy!r}"
            )
        self._policy_obj = policy

    @property
    def expansion_policy(self) -> ExpansionPolicy:
        """Chooses the nodes to expand (`semidyn_rag.expansion`)."""
        return self._policy_obj

    def _budget(self) -> int:
        """This query's expansion budget: context override, then the field."""
        k = _expand_override.get()
        return self.expand_top_k if k is None else k

    @classmethod
    def class_name(cls) -> str:
        return "SemiDynamicNodePostprocessor"

    @property
    def service(self) -> LatentService:
        """Share it with `SemiDynamicLLM`, so an answer right after compression reads memory."""
        return self._service

    def node_text(self, node: BaseNode | NodeWithScore) -> str:
        """The text compressed for ``node`` (what an offline precompression job must compress)."""
        node = node.node if isinstance(node, NodeWithScore) else node
        return node.get_content(metadata_mode=self.metadata_mode)

    def precompress(
        self,
        nodes: Sequence[BaseNode | NodeWithScore],
        config: PrecompressConfig | None = None,
        **kwargs: Any,
    ) -> PrecompressReport:
        """Offline: compress every node the service's store lacks (`semidyn_rag.precompress`).

        Run it over an index's nodes (e.g. ``index.docstore.docs.values()``) before serving.
        Texts and policy are this postprocessor's (``node_text``, and the ``scale``/``ratio`` it
        would use now, which replace those of ``config``), so the keys are the ones queries look
        up. ``config`` sets batching and progress; ``kwargs`` go to the core job (e.g. ``store_dtype``).
        Resumable: a rerun compresses only what is missing.
        """
        if self._service.store is None:
            raise ValueError("precompression needs a LatentService with a LatentStore")
        compression = self._compression()
        config = (config or PrecompressConfig(progress=False)).model_copy(
            update={"scale": compression.scale, "ratio": compression.ratio}
        )
        chunks = []
        for item in nodes:
            node = item.node if isinstance(item, NodeWithScore) else item
            text = self.node_text(node)
            if text.strip():
                chunks.append(
                    Chunk(id=node.node_id, doc_id=node.ref_doc_id or node.node_id, text=text)
                )
        return precompress(self._service.compressor, chunks, self._service.store, config, **kwargs)

    def _compression(self) -> CompressionPolicy:
        """The ratio policy of this query: the `compression_scale` override, then the fields,
        then the service's default (``None`` keeps the wider value)."""
        return self._service.policy_for(self.scale, self.ratio).override(_scale_override.get())

    def _todo(self, nodes: Sequence[NodeWithScore]) -> tuple[list[int], list[str]]:
        """Positions and texts of the nodes to compress: every node with text (empty ones pass).

        A node whose text is a marker is compressed like any text: a marker carries latents only
        into the LLM call it was issued for, never through a node.
        """
        positions, texts = [], []
        for i, node in enumerate(nodes):
            text = self.node_text(node)
            if text.strip():
                positions.append(i)
                texts.append(text)
        return positions, texts

    def _selection_args(
        self, nodes: list[NodeWithScore], positions: list[int], query: str
    ) -> dict[str, Any]:
        return {
            "query": query,
            "expand_top_k": self._budget(),
            "scores": [nodes[i].score for i in positions],
            "policy": self._policy_obj,
            "compression": self._compression(),
            "group": True,
        }

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        positions, texts = self._todo(nodes)
        query = query_bundle.query_str if query_bundle is not None else ""
        args = self._selection_args(nodes, positions, query)
        selection = self._service.compress_selectively(texts, **args)
        return self._merge(nodes, positions, texts, selection, args["compression"], query)

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        """Async path: the encoder (or the store read) runs in a worker thread."""
        positions, texts = self._todo(nodes)
        query = query_bundle.query_str if query_bundle is not None else ""
        args = self._selection_args(nodes, positions, query)
        selection = await self._service.acompress_selectively(texts, **args)
        return self._merge(nodes, positions, texts, selection, args["compression"], query)

    def _merge(
        self,
        nodes: list[NodeWithScore],
        positions: list[int],
        texts: list[str],
        selection: SelectiveCompression,
        compression: CompressionPolicy,
        query: str,
    ) -> list[NodeWithScore]:
        out = list(nodes)
        chunks: list[ChunkLatents] = []
        expanded: list[str] = []
        for j, (i, chunk) in enumerate(zip(positions, selection.chunks, strict=True)):
            if chunk is None:
                out[i] = self._expand(nodes[i], texts[j])
                expanded.append(texts[j])
            else:
                out[i] = self._replace(nodes[i], chunk, compression)
                chunks.append(chunk)
        # this query's LLM call must then hold every one of them, whole (SemiDynamicLLM checks)
        expect_delivery([c.slot for c in chunks], query, expanded)
        if expanded:
            logger.debug("expanded %d node(s) to plain text", len(expanded))
        if chunks:
            sources = [c.source for c in chunks]
            logger.debug(
                "compressed %d node(s): %d encoder, %d store, %d memory",
                len(chunks),
                sources.count("encoder"),
                sources.count("store"),
                sources.count("memory"),
            )
        return out

    def _expand(self, node: NodeWithScore, text: str) -> NodeWithScore:
        """A copy of the node whose LLM-visible content is ``text`` (``node_text``) alone."""
        extra = expanded_metadata(self._original_text(node))
        return self._copy(node, extra, text)

    def _original_text(self, node: NodeWithScore) -> str | None:
        if not self.keep_original_text:
            return None
        return node.node.get_content(metadata_mode=MetadataMode.NONE)

    def _replace(
        self, node: NodeWithScore, chunk: ChunkLatents, compression: CompressionPolicy
    ) -> NodeWithScore:
        """A copy of the node whose LLM-visible content is the marker and nothing else."""
        extra = chunk_metadata(
            chunk, compression=compression, original_text=self._original_text(node)
        )
        return self._copy(node, extra, chunk.marker)

    def _copy(self, node: NodeWithScore, extra: dict[str, Any], content: str) -> NodeWithScore:
        """The node with ``extra`` metadata (hidden from the LLM and the embedder) and ``content``."""
        metadata = {**node.node.metadata, **extra}
        ours = [k for k in extra if k not in node.node.excluded_embed_metadata_keys]
        copy = node.node.model_copy(
            update={
                "metadata": metadata,
                "excluded_llm_metadata_keys": list(metadata),
                "excluded_embed_metadata_keys": [*node.node.excluded_embed_metadata_keys, *ours],
                "embedding": None,
            }
        )
        copy.set_content(content)
        return NodeWithScore(node=copy, score=node.score)
