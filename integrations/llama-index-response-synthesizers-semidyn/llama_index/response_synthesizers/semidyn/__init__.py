"""LlamaIndex response synthesizer of semidyn-rag: answers from compressed (latent) contexts.

`SemiDynamicSynthesizer` hands every retrieved node to `SemiDynamicLLM`
(``llama_index.llms.semidyn``) in one call, in the decoder's training layout; `qa_prompt` is that
training prompt; `as_semidyn_query_engine` wires retrieval, `SemiDynamicNodePostprocessor`
(``llama_index.postprocessor.semidyn``), the LLM and this synthesizer into one query engine.
"""

from llama_index.response_synthesizers.semidyn.base import (
    SemiDynamicSynthesizer,
    as_semidyn_query_engine,
    qa_prompt,
    qa_template,
)

__all__ = [
    "SemiDynamicSynthesizer",
    "as_semidyn_query_engine",
    "qa_prompt",
    "qa_template",
]
__version__ = "0.1.0"
