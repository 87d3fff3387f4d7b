"""Bring your own model safely (issue 42): what a model argument may be, and failing fast offline."""

from __future__ import annotations

import time

import pytest

from flashback_integrations import FlashBackModel, ModelResolutionError
from flashback_integrations.loading import resolve


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable, as on this machine and in CI (no network but the package registries); a dead
    endpoint makes it so where a network exists."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_an_unreachable_hub_id_fails_within_seconds_with_the_offline_alternatives(offline) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelResolutionError, match="HF_HUB_OFFLINE=1") as caught:
        FlashBackModel.from_pretrained("someorg/some-model")
    assert time.perf_counter() - started < 10
    assert "'default'" in str(caught.value) and "local folder" in str(caught.value)


def test_a_cached_hub_id_loads_from_the_cache_without_retries(offline, tmp_path, monkeypatch) -> None:
    """Cached and unreachable: the cached files, with local_files_only (no minute of retries)."""
    seen = {}

    def fake_cache(repo, filename, revision=None):
        return str(tmp_path / "config.json")

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", fake_cache)

    class Loader:
        @staticmethod
        def from_pretrained(source, **kwargs):
            seen.update(kwargs)
            return "loaded"

    monkeypatch.setattr("transformers.AutoTokenizer", Loader)
    assert resolve.load_pretrained("someorg/some-model", "tokenizer") == "loaded"
    assert seen["local_files_only"] is True


@pytest.mark.parametrize("tag", ["llama3.2:1b", "qwen2.5:0.5b-instruct"])
def test_an_ollama_tag_says_what_a_model_argument_may_be(tag) -> None:
    with pytest.raises(ModelResolutionError, match="Ollama tag") as caught:
        FlashBackModel.from_pretrained(tag)
    assert "hub id" in str(caught.value) and "GGUF" in str(caught.value)


# ----------------------------------------------------------------------------- arguments are never dropped
@pytest.fixture(scope="module")
def chat_path(tmp_path_factory) -> str:
    from tiny import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("own-chat"))


def _classes():
    from flashback_integrations.langchain import ChatFlashBack
    from flashback_integrations.langchain import FlashBackLLM as LangChainLLM
    from flashback_integrations.llama_index import FlashBackLLM as LlamaIndexLLM

    return [ChatFlashBack, LangChainLLM, LlamaIndexLLM]


@pytest.mark.parametrize("index", range(3))
def test_ollama_and_llamacpp_arguments_map_to_ours_or_are_refused_by_name(chat_path, index) -> None:
    cls = _classes()[index]
    assert cls(model=chat_path, num_predict=7).max_new_tokens == 7
    assert cls(model=chat_path, repeat_penalty=1.3).repetition_penalty == 1.3
    for bad, named in [
        ({"format": "json"}, "with_structured_output"),
        ({"base_url": "http://localhost:11434"}, "server_url"),
        ({"num_ctx": 4096}, "context window"),
        ({"k": 3}, "num_passages"),
        ({"tempreature": 0.5}, "did you mean 'temperature'"),
        ({"num_predict": 5, "max_new_tokens": 6}, "same setting"),
    ]:
        with pytest.raises(ValueError, match=named):  # pydantic's ValidationError (a ValueError) wraps ours
            cls(model=chat_path, **bad)


def test_call_arguments_map_or_are_refused_too(chat_path) -> None:
    from flashback_integrations import ConfigError
    from flashback_integrations.langchain import ChatFlashBack

    chat = ChatFlashBack(model=chat_path, mode="none", max_tokens=3)
    message = chat.invoke("hi", num_predict=2)
    assert message.usage_metadata["output_tokens"] <= 2
    with pytest.raises(ConfigError, match="with_structured_output"):
        chat.invoke("hi", format="json")
