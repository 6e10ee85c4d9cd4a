"""`SemiDynamicLLM`: a LangChain text LLM that reads compressed chunks through their markers.

A chain hands the LLM a string; retrieved documents arrive in it as ``[[latent:<key>]]`` markers
(see `SemiDynamicDocumentCompressor`). The LLM resolves each marker into that chunk's latent span
and decodes with the compressor's decoder, so the prompt the model reads is a few latent positions
per chunk instead of the chunk's tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ._decoding import LatentDecoding, Outcome


def _llm_output(outcomes: list[Outcome], model_name: str) -> dict[str, Any]:
    """Summed usage over the prompts of one call, plus each prompt's chosen ratios."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for outcome in outcomes:
        for key, value in outcome.token_usage.items():
            usage[key] += value
    return {
        "token_usage": usage,
        "model_name": model_name,
        "latent_ratios": [outcome.info["latent_ratios"] for outcome in outcomes],
    }


class SemiDynamicLLM(LatentDecoding, LLM):
    """Text-completion model over a `LatentService`.

    Example:
        .. code-block:: python

            service = LatentService(compressor, store)
            llm = SemiDynamicLLM(service=service, max_new_tokens=64)
            docs = SemiDynamicDocumentCompressor(service=service).compress_documents(found, q)
            llm.invoke(qa_prompt(service).format(context=format_docs(docs), question=q))

    A call reads the markers of ``latent_documents=docs`` when given (the other markers are
    text; one of ``docs`` missing from the prompt is an `IncompleteContextError`), otherwise
    those of the newest compression call in the prompt: a marker pasted into the question from
    an earlier compression is text.

    Each generation's ``generation_info`` carries ``prompt_tokens`` (decoder positions, latent
    positions included), ``completion_tokens``, ``finish_reason`` and ``latent_ratios``;
    ``llm_output["token_usage"]`` sums the usage over the call's prompts for callbacks.
    """

    @property
    def _llm_type(self) -> str:
        return "semidyn"

    # ``_call``/``_acall`` satisfy the `LLM` interface; ``_generate``/``_agenerate`` below are what
    # LangChain actually calls, so usage and ratios reach callbacks through ``llm_output``.
    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._decode(prompt, stop, **kwargs).text

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return (await self._adecode(prompt, stop, **kwargs)).text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(self._decode_many(prompts, stop, **kwargs))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return self._result(await self._adecode_many(prompts, stop, **kwargs))

    def _result(self, outcomes: list[Outcome]) -> LLMResult:
        return LLMResult(
            generations=[[Generation(text=o.text, generation_info=o.info)] for o in outcomes],
            llm_output=_llm_output(outcomes, self._model_name),
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        """Real decoder tokens as they come; a last empty chunk carries usage and ratios."""
        yield from self._stream_chunks(prompt, stop, run_manager, _chunk, **kwargs)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for chunk in self._astream_chunks(prompt, stop, run_manager, _chunk, **kwargs):
            yield chunk


def _chunk(item: str | Outcome) -> GenerationChunk:
    """A text piece, or the final empty chunk with the generation's info (merged once, at the end)."""
    if isinstance(item, Outcome):
        return GenerationChunk(text="", generation_info=item.info)
    return GenerationChunk(text=item)
