"""A sentence-transformers embedding for retrieval next to semidyn compression (MiniLM offline)."""

from semidyn_rag.embeddings import DEFAULT_MODEL, default_model_path

from llama_index.embeddings.semidyn.base import SentenceTransformerEmbedding

__all__ = ["DEFAULT_MODEL", "SentenceTransformerEmbedding", "default_model_path"]
