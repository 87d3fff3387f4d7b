"""LangChain's standard chat-model suites (langchain-tests, pinned) on a tiny random model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from tiny import HashRetriever, save_tiny_chat_model

from flashback_integrations.langchain import ChatFlashBack

TINY = save_tiny_chat_model(Path(tempfile.mkdtemp(prefix="flashback-tiny-chat-")))
OTHER = save_tiny_chat_model(Path(tempfile.mkdtemp(prefix="flashback-tiny-chat-other-")), arch="qwen2")
PARAMS = {"model": TINY, "retriever": HashRetriever(), "stride": 4, "max_doc_tokens": 12}


class TestChatFlashBackUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatFlashBack]:
        return ChatFlashBack

    @property
    def model_override_value(self) -> str:
        return OTHER

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)


class TestChatFlashBackIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatFlashBack]:
        return ChatFlashBack

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    @property
    def model_override_value(self) -> str:
        return OTHER
