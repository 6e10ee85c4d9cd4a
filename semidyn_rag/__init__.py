"""semidyn-rag: semi-dynamic soft context compression for retrieval-augmented generation.

The public names are imported lazily: `semidyn_rag.store`, `semidyn_rag.metrics` and the CLI stay
cheap to import in worker processes that never touch torch models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PLACEHOLDER": "modeling",
    "LatentPrompt": "modeling",
    "SemiDynamicCompressor": "modeling",
    "TrainExample": "training.loss",
    "CompressorConfig": "config",
    "LoraSettings": "config",
    "CompressedContext": "types",
    "LatentService": "service",
    "LatentStore": "store",
}
__all__ = [
    "PLACEHOLDER",
    "CompressedContext",
    "CompressorConfig",
    "LatentPrompt",
    "LatentService",
    "LatentStore",
    "LoraSettings",
    "SemiDynamicCompressor",
    "TrainExample",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import CompressorConfig, LoraSettings
    from .modeling import PLACEHOLDER, LatentPrompt, SemiDynamicCompressor
    from .service import LatentService
    from .store import LatentStore
    from .training.loss import TrainExample
    from .types import CompressedContext


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'semidyn_rag' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
