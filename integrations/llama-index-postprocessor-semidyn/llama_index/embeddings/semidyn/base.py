"""`SentenceTransformerEmbedding`: a LlamaIndex embedding over a sentence-transformers model.

Retrieval still runs on ordinary text embeddings in the user's vector store (e.g. FAISS); only the
retrieved chunks are compressed. The default is all-MiniLM-L6-v2 (see
`semidyn_rag.embeddings.default_model_path`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from semidyn_rag.embeddings import default_model_path, encode, load_sentence_model


class SentenceTransformerEmbedding(BaseEmbedding):
    """Normalised sentence embeddings (cosine similarity = inner product, FAISS-friendly).

    ``model`` is a name or path that ``SentenceTransformer`` loads, or an already loaded model;
    ``None`` is all-MiniLM-L6-v2 (see :func:`default_model_path`).
    """

    device: str = Field(default="cpu", description="Where the model runs.")
    normalize: bool = Field(default=True, description="L2-normalise the vectors.")
    _model: Any = PrivateAttr()

    def __init__(self, model: str | Path | Any | None = None, **kwargs: Any) -> None:
        if model is None or isinstance(model, (str, Path)):
            kwargs.setdefault("model_name", str(model or default_model_path()))
        else:
            kwargs.setdefault("model_name", type(model).__name__)
        super().__init__(**kwargs)
        self._model = load_sentence_model(model, self.device)

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    @property
    def dimension(self) -> int:
        """Vector size (what a FAISS index for these embeddings is built with)."""
        return int(self._model.get_sentence_embedding_dimension())

    def _encode(self, texts: list[str]) -> list[Embedding]:
        return encode(self._model, texts, self.embed_batch_size, self.normalize)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(list(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
