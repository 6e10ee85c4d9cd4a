"""LLMLingua and LongLLMLingua (the ``llmlingua`` package) scored by our own base decoder, offline.

``llmlingua.PromptCompressor.__init__`` downloads a tiktoken encoding (to count tokens the way
OpenAI's API bills them) and loads its scorer with ``from_pretrained``. Neither works offline,
and neither is what a fair comparison wants: the scorer must be the base LM the decoder uses and
token counts must be the decoder's. So the compressor is built without its ``__init__`` and given

* ``tokenizer``: the compressor's decoder tokenizer;
* ``oai_tokenizer``: the same tokenizer behind tiktoken's ``encode`` (every count it reports —
  ``origin_tokens``, ``compressed_tokens`` — is then in decoder tokens);
* ``model``: the base decoder with the LoRA adapter *disabled*, wrapped to translate llmlingua's
  list-of-``(key, value)`` KV caches to and from ``transformers``' ``DynamicCache``.

The rest of the algorithm (perplexity ranking of contexts, iterative token-level filtering,
LongLLMLingua's question conditioning and contrastive perplexity) is the package's own code.
Install with ``pip install 'semidyn-rag[llmlingua]'``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from .peers import HardCompression, token_budget

if TYPE_CHECKING:
    from .modeling import SemiDynamicCompressor

__all__ = ["LinguaPeer", "llmlingua_version"]

INSTALL_HINT = "pip install 'semidyn-rag[llmlingua]' (or: pip install llmlingua)"


def llmlingua_version() -> str:
    """The installed ``llmlingua`` version; ``ImportError`` naming the install command if absent."""
    try:
        return importlib.metadata.version("llmlingua")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the LLMLingua peers need the llmlingua package: {INSTALL_HINT}"
        ) from None


class _DecoderTokens:
    """tiktoken's ``Encoding.encode`` interface over a Hugging Face tokenizer (no special tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str, **_: object) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]


class _BaseScorer:
    """The base decoder (adapter off) called the way llmlingua calls its causal LM."""

    def __init__(self, model: SemiDynamicCompressor) -> None:
        self._decoder = model.decoder
        forward = inspect.signature(model.decoder.get_base_model().forward).parameters
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns)
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Sequence[Sequence[torch.Tensor]] | None = None,
        use_cache: bool = True,
    ) -> SimpleNamespace:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values or ()])
        with self._decoder.disable_adapter():
            out = self._decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=True,
                **{self._cache_arg: cache},
            )
        cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        legacy = [(layer.keys, layer.values) for layer in cache.layers]
        return SimpleNamespace(logits=out.logits, past_key_values=legacy)


class LinguaPeer:
    """LLMLingua (``question_aware=False``) or LongLLMLingua (``True``) on ``model``'s base decoder.

    :meth:`compress` keeps ``Σ ceil(n_i / ratio)`` decoder tokens of a question's contexts as
    *target*; LLMLingua treats a target as a goal, not a bound, and :class:`HardCompression`
    reports what it reached. Settings follow the package's documented defaults: LLMLingua ranks
    contexts by perplexity and filters tokens iteratively; LongLLMLingua additionally conditions
    on the question (``condition_in_question="after_condition"``, ``condition_compare=True``),
    orders contexts by relevance (``reorder_context="sort"``) and spreads the budget over them
    (``dynamic_context_compression_ratio=0.3``). The filtering window is the package's 200 tokens,
    or the whole prompt when shorter (its windows assume at least one full window; a shorter
    prompt was barely compressed). Raises ``ImportError`` without ``llmlingua``.
    """

    def __init__(self, model: SemiDynamicCompressor, *, question_aware: bool) -> None:
        llmlingua_version()
        from llmlingua import PromptCompressor

        self.question_aware = question_aware
        # __init__ would download tiktoken's encoding and load a second model: set its state instead
        compressor = PromptCompressor.__new__(PromptCompressor)
        base_config = model.decoder.get_base_model().config
        compressor.__dict__.update(
            model_name=f"base decoder of {model.config.decoder_model or model.config.encoder_model}",
            use_llmlingua2=False,
            retrieval_model=None,
            retrieval_model_name=None,
            open_api_config={},
            cache_bos_num=10,
            prefix_bos_num=100,
            oai_tokenizer=_DecoderTokens(model.decoder_tokenizer),
            tokenizer=model.decoder_tokenizer,
            model=_BaseScorer(model),
            device=model.device,
            context_idxs=[],
            max_position_embeddings=base_config.max_position_embeddings,
        )
        self._compressor = compressor

    def compress(self, contexts: Sequence[str], question: str, ratio: float) -> HardCompression:
        """Compress ``contexts`` toward ``ratio``; the question is used only if question-aware."""
        start = time.perf_counter()
        encode = self._compressor.oai_tokenizer.encode
        lengths = [len(encode(c)) for c in contexts]
        target = sum(token_budget(n, ratio) for n in lengths)
        # llmlingua's windows assume a prompt of at least one window (200 tokens): shorter ones
        # are mis-windowed and barely compressed, so the window is never longer than the prompt
        window = max(1, min(200, len(encode("\n\n".join(contexts)))))
        kwargs: dict[str, Any] = {"rank_method": "llmlingua", "iterative_size": window}
        if self.question_aware:
            kwargs = {
                "question": question,
                "rank_method": "longllmlingua",
                "condition_in_question": "after_condition",
                "condition_compare": True,
                "reorder_context": "sort",
                "dynamic_context_compression_ratio": 0.3,
                "context_budget": "+100",
                "iterative_size": window,
            }
        result = self._compressor.compress_prompt(
            list(contexts), target_token=target, concate_question=False, **kwargs
        )
        text = result["compressed_prompt"].strip()
        kept = len(encode(text)) if text else 0
        return HardCompression(
            text=text,
            original_tokens=sum(lengths),
            kept_tokens=kept,
            seconds=time.perf_counter() - start,
        )
