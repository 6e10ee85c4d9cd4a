"""A LlamaIndex LLM that reads semidyn-compressed chunks through their latent markers."""

from semidyn_rag.service import (
    ContextWindowError,
    IncompleteContextError,
    LatentDeliveryError,
    UnknownMarkerError,
)

from llama_index.llms.semidyn.base import MalformedMarkerError, SemiDynamicLLM, render_messages

__all__ = [
    "ContextWindowError",
    "IncompleteContextError",
    "LatentDeliveryError",
    "MalformedMarkerError",
    "SemiDynamicLLM",
    "UnknownMarkerError",
    "render_messages",
]
