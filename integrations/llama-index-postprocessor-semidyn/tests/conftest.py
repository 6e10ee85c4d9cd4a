"""Real tiny models, a real latent store, a real FAISS index and a real embedding: no mocks.

The compressor is a random-weight Qwen3 with a locally trained tokenizer (`semidyn_rag.testing`),
its LoRA adapters randomized so that they matter; answers are noise, the plumbing is the real
one. Retrieval uses a hashing bag-of-words embedding: nodes sharing words with the query really
are nearer, so what FAISS retrieves can be asserted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import pytest
import torch
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field
from llama_index.core.schema import TextNode
from llama_index.vector_stores.faiss import FaissVectorStore
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.service import LatentService, expect_delivery
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import EncodeCounter, hashing_embedding, save_tiny_compressor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Soft context compression turns long passages into a few latent vectors.",
    "The Rhine flows from the Alps through Germany to the North Sea at Rotterdam.",
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


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' waits cost
    more than the work they split (this suite: ~100 s with 2 threads under load, ~30 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_pending_query() -> None:
    """Each test is its own query: no chunks a previous test retrieved are still expected."""
    expect_delivery([], "")


@pytest.fixture(scope="session")
def compressor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved compressor: every service below loads the same weights, like a new process."""
    return save_tiny_compressor(tmp_path_factory.mktemp("li_tiny"), CORPUS * 20)


@pytest.fixture
def load_compressor(compressor_dir: Path) -> Callable[[], SemiDynamicCompressor]:
    return lambda: SemiDynamicCompressor.from_pretrained(compressor_dir).eval()


@pytest.fixture(scope="session")
def compressor(compressor_dir: Path) -> SemiDynamicCompressor:
    """Loaded once: tests share the weights, each test gets its own store and service."""
    return SemiDynamicCompressor.from_pretrained(compressor_dir).eval()


@pytest.fixture
def encode_counter(compressor: SemiDynamicCompressor) -> Iterator[EncodeCounter]:
    counter = EncodeCounter(compressor)
    yield counter
    counter.uninstall()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "latents"


@pytest.fixture
def store(store_path: Path, compressor: SemiDynamicCompressor) -> Iterator[LatentStore]:
    with LatentStore(store_path, compressor.fingerprint) as latent_store:
        yield latent_store


@pytest.fixture
def service(compressor: SemiDynamicCompressor, store: LatentStore) -> LatentService:
    return LatentService(compressor, store)


@pytest.fixture
def nodes() -> list[TextNode]:
    return [
        TextNode(text=text, id_=f"node{i}", metadata={"file_name": f"doc{i}.txt", "page": i})
        for i, text in enumerate(CORPUS)
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
