"""Real tiny models, a real latent store and a real (deterministic) embedding: no mocks.

The shared fixtures (a saved tiny compressor, its store and service, encoder counters) come from
`semidyn_rag.testing`, as for the other suites. Retrieval uses a hashing bag-of-words embedding:
documents sharing words with the query really are nearer, so FAISS results can be asserted.
"""

from __future__ import annotations

import os

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import (
    PASSAGES,
    compressor_dir,
    count_encodes,
    count_passes,
    encode_counter,
    hashing_embedding,
    load_compressor,
    one_torch_thread,
    service,
    store,
    store_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [  # fixtures used by this suite, imported from the one shared place
    "compressor_dir",
    "count_encodes",
    "count_passes",
    "encode_counter",
    "load_compressor",
    "one_torch_thread",
    "service",
    "store",
    "store_path",
]


class HashingEmbeddings(Embeddings):
    """`semidyn_rag.testing.hashing_embedding` as LangChain `Embeddings`."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [hashing_embedding(t, self.dim) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return hashing_embedding(text, self.dim)


@pytest.fixture
def compressor(load_compressor) -> SemiDynamicCompressor:
    """A fresh load per test: no state (memory, adapters, counters) carries over between tests."""
    return load_compressor()


@pytest.fixture
def documents() -> list[Document]:
    return [
        Document(page_content=text, metadata={"source": f"doc{i}.txt"}, id=f"doc{i}")
        for i, text in enumerate(PASSAGES)
    ]


@pytest.fixture
def embeddings() -> HashingEmbeddings:
    return HashingEmbeddings()
