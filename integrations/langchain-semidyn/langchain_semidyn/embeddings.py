"""`SentenceTransformerEmbeddings`: LangChain `Embeddings` over a sentence-transformers model.

Retrieval still runs on ordinary text embeddings in the user's vector store (e.g. LangChain's
FAISS); only the retrieved chunks are compressed. The default model is all-MiniLM-L6-v2 (see
`semidyn_rag.embeddings.default_model_path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings
from semidyn_rag.embeddings import encode, load_sentence_model


class SentenceTransformerEmbeddings(Embeddings):
    """Normalised sentence embeddings (cosine similarity = inner product, FAISS-friendly)."""

    def __init__(
        self,
        model: str | Path | Any | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        normalize: bool = True,
    ) -> None:
        self.model = load_sentence_model(model, device)
        self.batch_size = batch_size
        self.normalize = normalize

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return encode(self.model, list(texts), self.batch_size, self.normalize)

    def embed_query(self, text: str) -> list[float]:
        return encode(self.model, [text], self.batch_size, self.normalize)[0]
