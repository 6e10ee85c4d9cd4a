"""LlamaIndex's package check: the exported LLM is a LlamaIndex LLM."""

from llama_index.core.base.llms.base import BaseLLM

from llama_index.llms.semidyn import SemiDynamicLLM


def test_llm_class() -> None:
    names_of_base_classes = [b.__name__ for b in SemiDynamicLLM.__mro__]
    assert BaseLLM.__name__ in names_of_base_classes
