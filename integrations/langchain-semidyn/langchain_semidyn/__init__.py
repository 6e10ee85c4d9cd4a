"""LangChain integration of semidyn-rag: compress retrieved documents, answer from their latents."""

from semidyn_rag.expansion import DensityPolicy, ExpansionPolicy, TopScorePolicy

from .chains import compression_step, create_semidyn_rag_chain
from .chat_models import ChatSemiDynamic, render_messages
from .document_compressors import SemiDynamicDocumentCompressor
from .llms import SemiDynamicLLM
from .prompts import format_docs, qa_chat_prompt, qa_prompt, qa_template

__all__ = [
    "ChatSemiDynamic",
    "DensityPolicy",
    "ExpansionPolicy",
    "SemiDynamicDocumentCompressor",
    "SemiDynamicLLM",
    "TopScorePolicy",
    "compression_step",
    "create_semidyn_rag_chain",
    "format_docs",
    "qa_chat_prompt",
    "qa_prompt",
    "qa_template",
    "render_messages",
]
__version__ = "0.1.0"
