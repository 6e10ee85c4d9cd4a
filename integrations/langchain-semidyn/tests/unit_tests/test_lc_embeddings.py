"""The sentence-transformers adapter in a LangChain FAISS store (all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import pytest
from langchain_community.vectorstores import FAISS
from semidyn_rag.embeddings import DEFAULT_MODEL, default_model_path

pytest.importorskip("sentence_transformers")
if default_model_path() == DEFAULT_MODEL:
    pytest.skip("the offline all-MiniLM-L6-v2 package is not installed", allow_module_level=True)


def test_minilm_embeddings_retrieve_by_meaning(documents) -> None:
    from langchain_semidyn import SentenceTransformerEmbeddings

    embeddings = SentenceTransformerEmbeddings()
    vector = embeddings.embed_query("hello")
    assert len(vector) == 384
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-4  # normalised
    store = FAISS.from_documents(documents, embeddings)
    (hit,) = store.similarity_search("Which river reaches the sea in the Netherlands?", k=1)
    assert hit.page_content.startswith("The Rhine")
    (hit,) = store.similarity_search("Where was the girl born?", k=1)
    assert hit.page_content.startswith("Alice")
