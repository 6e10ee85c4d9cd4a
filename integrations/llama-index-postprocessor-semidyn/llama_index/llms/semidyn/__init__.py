"""A LlamaIndex LLM that reads semidyn-compressed chunks through their latent markers."""

from semidyn_rag.service import UnknownMarkerError

from llama_index.llms.semidyn.base import MalformedMarkerError, SemiDynamicLLM, render_messages

__all__ = ["MalformedMarkerError", "SemiDynamicLLM", "UnknownMarkerError", "render_messages"]
