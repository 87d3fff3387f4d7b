"""LangChain's standard chat-model suites (langchain-tests, pinned) on a tiny random model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests
from tiny import HashRetriever, save_tiny_chat_model

from flashback_integrations.langchain import ChatFlashBack, FlashBackEmbeddings

TINY = save_tiny_chat_model(Path(tempfile.mkdtemp(prefix="flashback-tiny-chat-")), positions=4096)  # room for tools
OTHER = save_tiny_chat_model(Path(tempfile.mkdtemp(prefix="flashback-tiny-chat-other-")), arch="qwen2")
PARAMS = {"model": TINY, "retriever": HashRetriever(), "stride": 4, "max_doc_tokens": 12}


class Capabilities:
    """What ChatFlashBack supports, so the suite runs those tests too (no xfail). Their assertions are
    about content (a call of magic_function with input 3, a joke with a setup and a punchline, tool
    results read back), which a random model cannot write: they run on the real default model."""

    has_tool_calling = True
    has_tool_choice = True
    tool_choice_value = "any"
    has_structured_output = True
    supports_json_mode = True
    structured_output_kwargs: dict = {}
    returns_usage_metadata = True


class TestChatFlashBackUnit(Capabilities, ChatModelUnitTests):
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
    # A random model cannot write what the tool and structured-output tests check (input 3, a joke):
    # those run in TestChatFlashBackDefaultModel; tests/langchain/test_tools.py covers the mechanics here.
    has_tool_calling = False
    has_tool_choice = False
    has_structured_output = False
    supports_json_mode = False

    @property
    def chat_model_class(self) -> type[ChatFlashBack]:
        return ChatFlashBack

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    @property
    def model_override_value(self) -> str:
        return OTHER


@pytest.mark.slow
class TestChatFlashBackDefaultModel(Capabilities, ChatModelIntegrationTests):
    """The whole integration suite, tools and structured output included, on SmolLM2-135M-Instruct
    with the shipped adapter, retrieving in its own layout."""

    @property
    def chat_model_class(self) -> type[ChatFlashBack]:
        return ChatFlashBack

    @property
    def chat_model_params(self) -> dict:
        # SmolLM2-135M was not trained to decide when to call a tool: "first" makes the first turn a call
        return {"model": "default", "retriever": HashRetriever(), "max_tokens": 64, "default_tool_choice": "first"}

    @property
    def supports_model_override(self) -> bool:
        return False


class TestFlashBackEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[FlashBackEmbeddings]:
        return FlashBackEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {}


class TestFlashBackEmbeddingsIntegration(EmbeddingsIntegrationTests):
    """On the offline all-MiniLM-L6-v2 the Chroma store uses."""

    @property
    def embeddings_class(self) -> type[FlashBackEmbeddings]:
        return FlashBackEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {}
