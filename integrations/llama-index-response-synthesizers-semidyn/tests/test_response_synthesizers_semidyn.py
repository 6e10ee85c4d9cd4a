"""LlamaIndex's package check: the exported synthesizer is a LlamaIndex response synthesizer."""

from llama_index.core.response_synthesizers import BaseSynthesizer

from llama_index.response_synthesizers.semidyn import SemiDynamicSynthesizer


def test_synthesizer_class() -> None:
    names_of_base_classes = [b.__name__ for b in SemiDynamicSynthesizer.__mro__]
    assert BaseSynthesizer.__name__ in names_of_base_classes
