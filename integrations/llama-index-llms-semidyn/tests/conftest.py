"""Real tiny models and a real latent store: no mocks.

The shared fixtures (a saved tiny compressor, its store and service) come from
`semidyn_rag.testing`, as for the other suites; answers are noise, the plumbing is the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import (
    compressor_dir,
    count_passes,
    no_pending_query,
    one_torch_thread,
    service,
    store,
    store_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = [  # fixtures used by this suite, imported from the one shared place
    "compressor_dir",
    "count_passes",
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
