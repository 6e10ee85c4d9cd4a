"""semidyn-rag: semi-dynamic soft context compression for retrieval-augmented generation."""

from .config import CompressorConfig, LoraSettings
from .modeling import PLACEHOLDER, LatentPrompt, SemiDynamicCompressor, TrainExample
from .types import CompressedContext

__all__ = [
    "PLACEHOLDER",
    "CompressedContext",
    "CompressorConfig",
    "LatentPrompt",
    "LoraSettings",
    "SemiDynamicCompressor",
    "TrainExample",
]
__version__ = "0.1.0"
