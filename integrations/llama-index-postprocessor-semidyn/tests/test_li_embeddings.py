"""SentenceTransformerEmbedding: the real all-MiniLM-L6-v2, loaded offline from its package."""

from __future__ import annotations

import math

import pytest

from llama_index.embeddings.semidyn import SentenceTransformerEmbedding, default_model_path


@pytest.fixture(scope="module")
def embedding() -> SentenceTransformerEmbedding:
    return SentenceTransformerEmbedding()


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_default_is_the_bundled_minilm(embedding) -> None:
    assert embedding.model_name == default_model_path()
    assert embedding.dimension == 384


async def test_vectors_are_normalised_and_rank_by_meaning(embedding) -> None:
    docs = [
        "The Rhine flows into the North Sea near Rotterdam.",
        "An octopus has three hearts and blue blood.",
    ]
    vectors = embedding.get_text_embedding_batch(docs)
    assert all(math.isclose(dot(v, v), 1.0, rel_tol=1e-4) for v in vectors)
    query = embedding.get_query_embedding("Which river reaches the sea at Rotterdam?")
    assert dot(query, vectors[0]) > dot(query, vectors[1])
    assert await embedding.aget_query_embedding("Which river reaches the sea at Rotterdam?") == (
        pytest.approx(query, abs=1e-6)
    )
    assert await embedding.aget_text_embedding_batch(docs) == [
        pytest.approx(v, abs=1e-6) for v in vectors
    ]


def test_wraps_a_loaded_model(embedding) -> None:
    again = SentenceTransformerEmbedding(embedding._model, normalize=False)
    assert again.model_name == "SentenceTransformer"
    assert len(again.get_text_embedding("hello")) == 384
