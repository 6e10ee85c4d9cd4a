"""LlamaIndex's package check: the exported postprocessor is a LlamaIndex node postprocessor."""

from llama_index.core.postprocessor.types import BaseNodePostprocessor

from llama_index.postprocessor.semidyn import SemiDynamicNodePostprocessor


def test_postprocessor_class() -> None:
    names_of_base_classes = [b.__name__ for b in SemiDynamicNodePostprocessor.__mro__]
    assert BaseNodePostprocessor.__name__ in names_of_base_classes
