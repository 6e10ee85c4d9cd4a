"""Real tiny models, a real latent store and a real (deterministic) embedding: no mocks.

The compressor is a random-weight Qwen3 with a locally trained tokenizer (`semidyn_rag.tiny`),
its LoRA adapters randomized so that they matter. Retrieval uses a hashing bag-of-words embedding:
documents sharing words with the query really are nearer, so FAISS results can be asserted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from semidyn_rag.config import CompressorConfig
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore
from semidyn_rag.testing import EncodeCounter, hashing_embedding, randomize_lora
from semidyn_rag.tiny import build_qwen3, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Soft context compression turns long passages into a few latent vectors.",
    "The Rhine flows from the Alps through Germany to the North Sea at Rotterdam.",
]


class HashingEmbeddings(Embeddings):
    """`semidyn_rag.testing.hashing_embedding` as LangChain `Embeddings`."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [hashing_embedding(t, self.dim) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return hashing_embedding(text, self.dim)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads and lose a lot on a shared CPU (half the time here).

    Restored after each test so that other test directories in the same run keep their setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=400)
    return build_qwen3(tmp_path_factory.mktemp("lc_tiny_qwen3"), tokenizer)


@pytest.fixture(scope="session")
def saved_compressor_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained-looking compressor on disk: every session below loads the same weights."""
    torch.manual_seed(0)
    config = CompressorConfig(encoder_model=str(tiny_dir), converter_hidden=48)
    model = randomize_lora(SemiDynamicCompressor.from_config(config)).eval()
    out = tmp_path_factory.mktemp("lc_compressor")
    model.save_pretrained(out)
    return out


@pytest.fixture
def load_compressor(saved_compressor_dir: Path) -> Callable[[], SemiDynamicCompressor]:
    """A fresh load of the saved compressor, as a new process would do."""
    return lambda: SemiDynamicCompressor.from_pretrained(saved_compressor_dir).eval()


@pytest.fixture
def compressor(load_compressor) -> SemiDynamicCompressor:
    return load_compressor()


@pytest.fixture
def encode_counter(compressor: SemiDynamicCompressor) -> EncodeCounter:
    return EncodeCounter(compressor)


@pytest.fixture
def count_encodes() -> type[EncodeCounter]:
    """``count_encodes(compressor)`` wraps another compressor's ``encode`` (e.g. a new session's)."""
    return EncodeCounter


@pytest.fixture
def store(tmp_path: Path, compressor: SemiDynamicCompressor) -> Iterator[LatentStore]:
    with LatentStore(tmp_path / "store", compressor.fingerprint) as latent_store:
        yield latent_store


@pytest.fixture
def service(compressor: SemiDynamicCompressor, store: LatentStore) -> LatentService:
    return LatentService(compressor, store)


@pytest.fixture
def documents() -> list[Document]:
    return [
        Document(page_content=text, metadata={"source": f"doc{i}.txt"}, id=f"doc{i}")
        for i, text in enumerate(CORPUS)
    ]


@pytest.fixture
def embeddings() -> HashingEmbeddings:
    return HashingEmbeddings()
