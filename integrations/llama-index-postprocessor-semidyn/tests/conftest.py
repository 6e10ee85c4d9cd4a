"""Real tiny models and a real latent store: no mocks.

The shared fixtures (a saved tiny compressor, its store and service, encoder counters) come from
`semidyn_rag.testing`, as for the other suites; the postprocessor runs on the nodes a retriever
would return. The query-engine suites (retrieval, the LLM) are
llama-index-response-synthesizers-semidyn's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from llama_index.core.schema import TextNode
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import (
    PASSAGES,
    compressor_dir,
    encode_counter,
    load_compressor,
    no_pending_query,
    one_torch_thread,
    service,
    store,
    store_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [  # fixtures used by this suite, imported from the one shared place
    "compressor_dir",
    "encode_counter",
    "load_compressor",
    "no_pending_query",
    "one_torch_thread",
    "service",
    "store",
    "store_path",
]


@pytest.fixture(scope="session")
def compressor(compressor_dir: Path) -> SemiDynamicCompressor:
    """Loaded once: tests share the weights, each test gets its own store and service."""
    return SemiDynamicCompressor.from_pretrained(compressor_dir).eval()


@pytest.fixture
def nodes() -> list[TextNode]:
    return [
        TextNode(text=text, id_=f"node{i}", metadata={"file_name": f"doc{i}.txt", "page": i})
        for i, text in enumerate(PASSAGES)
    ]
