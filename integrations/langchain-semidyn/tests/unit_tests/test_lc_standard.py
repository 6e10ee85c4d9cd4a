"""LangChain's standard chat-model unit tests (``langchain-tests``), as partner packages run them.

Capabilities the decoder does not have (tools, structured output, JSON mode, images, audio, PDFs,
switching models per call) are declared through the suite's properties, so their tests skip
with the suite's own reason instead of being skipped by hand.
"""

from __future__ import annotations

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_semidyn import ChatSemiDynamic


class TestChatSemiDynamicStandard(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _bind_service(self, service) -> None:
        self._service = service

    @property
    def chat_model_class(self) -> type[ChatSemiDynamic]:
        return ChatSemiDynamic

    @property
    def chat_model_params(self) -> dict:
        return {"service": self._service}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False  # one compressor per model object; a per-call `model` is refused
