"""LangChain's standard chat-model integration tests against a real (tiny, local) decoder.

Every generation below runs the compressor's decoder; nothing is mocked or recorded. Unsupported
capabilities are declared through the suite's properties (their tests skip with its reason).
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_semidyn import ChatSemiDynamic

pytestmark = pytest.mark.integration  # LangChain's integration suite: many generations


class TestChatSemiDynamicIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _bind_service(self, service) -> None:
        self._service = service

    @property
    def chat_model_class(self) -> type[ChatSemiDynamic]:
        return ChatSemiDynamic

    @property
    def chat_model_params(self) -> dict:
        # Random tiny weights may emit <eos> first; an empty answer would fail the suite's
        # non-empty checks for a reason that says nothing about the integration.
        return {"service": self._service, "model_kwargs": {"min_new_tokens": 1}}

    @property
    def standard_chat_model_params(self) -> dict:
        return {**super().standard_chat_model_params, "max_tokens": 8}

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
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False
