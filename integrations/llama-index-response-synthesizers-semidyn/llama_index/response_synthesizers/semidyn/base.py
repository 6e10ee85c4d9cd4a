"""`SemiDynamicSynthesizer` and the query-engine wiring: the training prompt, one-call setup.

The decoder was trained on one prompt (the compressor's ``prompt_template``, by default
``"Context: {context}\\nQuestion: {question}"``) with one context placeholder per line, and reads
a context only as latents. LlamaIndex's stock response modes do not fit that exactly:

* ``compact`` and ``tree_summarize`` pack by a token count; with the LLM's ``prompt_helper`` (what
  ``as_semidyn_query_engine(response_mode=...)`` passes) it counts a marker as its latent
  positions, so they make one call when the decoder can hold every chunk;
* ``refine``, ``accumulate`` and ``compact_accumulate`` give each chunk (or pack) its own call, and
  ``simple_summarize`` truncates at its token limit and (llama-index-core 0.12-0.14) hands the
  template the *list* of chunks, so the prompt reads ``Context: ['[[latent:..]]\\n..']``.

Whatever the mode, `SemiDynamicLLM` refuses a call that holds only some of a query's retrieved
chunks, a cut marker, or more than the decoder's window, with a `LatentDeliveryError` that reaches
the caller: a chunk is never dropped silently. `SemiDynamicSynthesizer` is ``simple_summarize``
without truncation and list formatting: one call, node texts one per line, the training layout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from llama_index.core.indices.base import BaseIndex
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import (
    BaseSynthesizer,
    ResponseMode,
    SimpleSummarize,
    get_response_synthesizer,
)
from llama_index.core.types import RESPONSE_TEXT_TYPE
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import SemiDynamicNodePostprocessor
from semidyn_rag.expansion import ExpansionPolicy
from semidyn_rag.service import LatentService

logger = logging.getLogger(__name__)

_NO_CONTEXT = frozenset({ResponseMode.GENERATION, ResponseMode.NO_TEXT, ResponseMode.CONTEXT_ONLY})
"""Stock modes that never hand the retrieved chunks to the LLM."""


def qa_template(service: LatentService) -> str:
    """The compressor's training prompt with LlamaIndex's ``{context_str}``/``{query_str}``."""
    return service.qa_template("{context_str}", "{query_str}")


def qa_prompt(service: LatentService) -> PromptTemplate:
    """:func:`qa_template` as the ``text_qa_template`` of a query engine."""
    return PromptTemplate(qa_template(service))


class SemiDynamicSynthesizer(SimpleSummarize):
    """``simple_summarize`` for latent contexts: one LLM call, node texts one per line.

    No truncation by text tokens (it would cut markers, whose text length is not their latent
    length) and no list formatting of the context (see the module docstring).
    """

    def _prompt(self, query_str: str, text_chunks: Sequence[str]) -> tuple[BasePromptTemplate, str]:
        template = self._text_qa_template.partial_format(query_str=query_str)
        return template, "\n".join(text_chunks)

    def get_response(
        self, query_str: str, text_chunks: Sequence[str], **kwargs: Any
    ) -> RESPONSE_TEXT_TYPE:
        template, context = self._prompt(query_str, text_chunks)
        if self._streaming:
            return self._llm.stream(template, context_str=context, **kwargs)
        return self._llm.predict(template, context_str=context, **kwargs) or "Empty Response"

    async def aget_response(
        self, query_str: str, text_chunks: Sequence[str], **kwargs: Any
    ) -> RESPONSE_TEXT_TYPE:
        template, context = self._prompt(query_str, text_chunks)
        if self._streaming:
            return await self._llm.astream(template, context_str=context, **kwargs)
        return await self._llm.apredict(template, context_str=context, **kwargs) or "Empty Response"


def as_semidyn_query_engine(
    index: BaseIndex,
    service: LatentService,
    *,
    llm: SemiDynamicLLM | None = None,
    similarity_top_k: int = 2,
    scale: float | None = None,
    ratio: float | None = None,
    streaming: bool = False,
    node_postprocessors: Sequence[BaseNodePostprocessor] = (),
    response_mode: ResponseMode | str | None = None,
    expand_top_k: int = 0,
    expansion_policy: ExpansionPolicy | None = None,
    **kwargs: Any,
) -> RetrieverQueryEngine:
    """``index.as_query_engine`` wired for compressed contexts.

    Retrieval from ``index`` as usual, then ``node_postprocessors`` (e.g. a reranker, on text),
    then `SemiDynamicNodePostprocessor` (last: it replaces text by markers), then one decoder call
    through `SemiDynamicSynthesizer` with the training prompt. A stock ``response_mode`` instead
    gets the training prompt and the LLM's ``prompt_helper`` (markers counted as latents); the
    modes that split chunks over calls fail with `IncompleteContextError` (module docstring).
    ``expand_top_k`` nodes (chosen by ``expansion_policy``, default: the best retrieval scores)
    reach the decoder as plain text, the rest as latents (`SemiDynamicNodePostprocessor`).
    ``kwargs`` go to the retriever.
    """
    llm = llm or SemiDynamicLLM(service)
    compressor = SemiDynamicNodePostprocessor(
        service,
        scale=scale,
        ratio=ratio,
        expand_top_k=expand_top_k,
        expansion_policy=expansion_policy,
    )
    synthesizer: BaseSynthesizer
    if response_mode is None:
        synthesizer = SemiDynamicSynthesizer(
            llm=llm, text_qa_template=qa_prompt(service), streaming=streaming
        )
    else:
        mode = ResponseMode(response_mode)
        if mode in _NO_CONTEXT:
            raise ValueError(
                f"response_mode={mode.value!r} does not read the retrieved chunks; use "
                "compact, tree_summarize or the default (None)"
            )
        synthesizer = get_response_synthesizer(
            llm=llm,
            prompt_helper=llm.prompt_helper(),
            text_qa_template=qa_prompt(service),
            response_mode=mode,
            streaming=streaming,
        )
    return index.as_query_engine(
        llm=llm,
        similarity_top_k=similarity_top_k,
        node_postprocessors=[*node_postprocessors, compressor],
        response_synthesizer=synthesizer,
        **kwargs,
    )
