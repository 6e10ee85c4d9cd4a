"""Real tiny models, a real latent store, a real FAISS index and a real embedding: no mocks.

The shared fixtures (a saved tiny compressor, its store and service, encoder counters) come from
`semidyn_rag.testing`, as for the other suites; answers are noise, the plumbing is the real one.
Retrieval uses a hashing bag-of-words embedding: nodes sharing words with the query really are
nearer, so what FAISS retrieves can be asserted.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import pytest
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field
from llama_index.core.schema import TextNode
from llama_index.vector_stores.faiss import FaissVectorStore
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import (
    PASSAGES,
    compressor_dir,
    encode_counter,
    hashing_embedding,
    load_compressor,
    no_pending_query,
    one_torch_thread,
    service,
    store,
    store_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [  # fixtures used by this suite, imported from the one shared place
    "compressor_dir",
    "encode_counter",
    "load_compressor",
    "no_pending_query",
    "one_torch_thread",
    "service",
    "store",
    "store_path",
]


class HashingEmbedding(BaseEmbedding):
    """LlamaIndex face of `semidyn_rag.testing.hashing_embedding` (deterministic, word-based)."""

    dim: int = Field(default=256)

    def _get_query_embedding(self, query: str) -> Embedding:
        return hashing_embedding(query, self.dim)

    def _get_text_embedding(self, text: str) -> Embedding:
        return hashing_embedding(text, self.dim)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return hashing_embedding(query, self.dim)


@pytest.fixture(scope="session")
def compressor(compressor_dir: Path) -> SemiDynamicCompressor:
    """Loaded once: tests share the weights, each test gets its own store and service."""
    return SemiDynamicCompressor.from_pretrained(compressor_dir).eval()


@pytest.fixture
def nodes() -> list[TextNode]:
    return [
        TextNode(text=text, id_=f"node{i}", metadata={"file_name": f"doc{i}.txt", "page": i})
        for i, text in enumerate(PASSAGES)
    ]


@pytest.fixture
def embed_model() -> HashingEmbedding:
    return HashingEmbedding()


@pytest.fixture
def index(nodes: list[TextNode], embed_model: HashingEmbedding) -> VectorStoreIndex:
    """A FAISS-backed vector index (exact inner product on normalised vectors)."""
    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(embed_model.dim))
    storage = StorageContext.from_defaults(vector_store=vector_store)
    return VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model)
