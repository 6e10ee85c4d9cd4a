"""LlamaIndex integration of semidyn-rag: compress retrieved nodes into cached latent markers.

`SemiDynamicNodePostprocessor` swaps node text for markers of the nodes' latents (store hits
first), or keeps the best ones as text (``expand_top_k``); `SemiDynamicLLM`
(``llama_index.llms.semidyn``) reads them; `as_semidyn_query_engine`
wires both into a query engine with the decoder's training prompt.
"""

from semidyn_rag.expansion import DensityPolicy, ExpansionPolicy, TopScorePolicy

from llama_index.postprocessor.semidyn.base import (
    EXPANDED,
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
    expansion_top_k,
)
from llama_index.postprocessor.semidyn.engine import (
    SemiDynamicSynthesizer,
    as_semidyn_query_engine,
    qa_prompt,
    qa_template,
)

__all__ = [
    "EXPANDED",
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
    "DensityPolicy",
    "ExpansionPolicy",
    "SemiDynamicNodePostprocessor",
    "SemiDynamicSynthesizer",
    "TopScorePolicy",
    "as_semidyn_query_engine",
    "compression_scale",
    "expansion_top_k",
    "qa_prompt",
    "qa_template",
]
__version__ = "0.1.0"
