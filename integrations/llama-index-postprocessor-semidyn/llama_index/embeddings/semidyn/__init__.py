"""A sentence-transformers embedding for retrieval next to semidyn compression (MiniLM offline)."""

from llama_index.embeddings.semidyn.base import (
    DEFAULT_MODEL,
    SentenceTransformerEmbedding,
    default_model_path,
)

__all__ = ["DEFAULT_MODEL", "SentenceTransformerEmbedding", "default_model_path"]
