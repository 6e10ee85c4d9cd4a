"""LlamaIndex integration of semidyn-rag: compress retrieved nodes into cached latent markers.

`SemiDynamicNodePostprocessor` swaps node text for markers of the nodes' latents (store hits
first); `SemiDynamicLLM` (``llama_index.llms.semidyn``) reads them; `as_semidyn_query_engine`
wires both into a query engine with the decoder's training prompt.
"""

from llama_index.postprocessor.semidyn.base import (
    KEY,
    NUM_LATENTS,
    ORIGINAL_TEXT,
    ORIGINAL_TOKENS,
    PREDICTED_Y,
    PREFIX,
    RATIO,
    SCALE,
    SEGMENT_RATIOS,
    SOURCE,
    SemiDynamicNodePostprocessor,
    compression_scale,
)
from llama_index.postprocessor.semidyn.engine import (
    SemiDynamicSynthesizer,
    as_semidyn_query_engine,
    qa_prompt,
    qa_template,
)

__all__ = [
    "KEY",
    "NUM_LATENTS",
    "ORIGINAL_TEXT",
    "ORIGINAL_TOKENS",
    "PREDICTED_Y",
    "PREFIX",
    "RATIO",
    "SCALE",
    "SEGMENT_RATIOS",
    "SOURCE",
    "SemiDynamicNodePostprocessor",
    "SemiDynamicSynthesizer",
    "as_semidyn_query_engine",
    "compression_scale",
    "qa_prompt",
    "qa_template",
]
__version__ = "0.1.0"
