"""LlamaIndex node postprocessor of semidyn-rag: retrieved nodes become cached latent markers.

`SemiDynamicNodePostprocessor` swaps node text for markers of the nodes' latents (store hits
first), or keeps the best ones as text (``expand_top_k``); `SemiDynamicLLM`
(``llama_index.llms.semidyn``) reads them, and ``llama_index.response_synthesizers.semidyn``
(`as_semidyn_query_engine`) wires the three into a query engine.
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
    "TopScorePolicy",
    "compression_scale",
    "expansion_top_k",
]
__version__ = "0.1.0"
