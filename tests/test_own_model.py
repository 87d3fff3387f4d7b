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


# ----------------------------------------------------------------------------- safe defaults for any model
def test_a_model_without_an_adapter_reads_passages_isolated_and_says_why(chat_path, caplog) -> None:
    import logging

    from tiny import HashRetriever

    from flashback_integrations import FlashBackConfig

    fb = FlashBackModel.from_pretrained(chat_path, adapter="none")
    with caplog.at_level(logging.INFO, logger="flashback_integrations"):
        result = fb.generate("The json module", HashRetriever(), config=FlashBackConfig(stride=4), max_new_tokens=6)
        fb.generate("The json module", HashRetriever(), config=FlashBackConfig(stride=4), max_new_tokens=6)
    assert result.mode == "isolated" and "rotary" in result.mode_reason
    assert [r.message for r in caplog.records].count(f"{fb.name}: mode=isolated ({result.mode_reason})") == 1
    named = fb.generate("x", HashRetriever(), config=FlashBackConfig(mode="prepend"), max_new_tokens=2)
    assert named.mode == "prepend" and named.mode_reason is None


def test_a_model_without_rotary_positions_gets_its_passages_in_the_prompt() -> None:
    from tiny import make_model

    model, tok = make_model("gpt2", marks=False)
    fb = FlashBackModel(model, tok)
    assert fb.default_mode() == (
        "prepend",
        "no FlashBack adapter and no rotary positions: the passages go before the prompt",
    )


def test_untrained_append_runs_only_when_asked_and_warns_once_with_its_cost() -> None:
    from tiny import HashRetriever, make_model

    from flashback_integrations import FlashBackConfig

    fb = FlashBackModel(*make_model("llama", marks=False), name="bare")  # no marks, no adapter
    with pytest.warns(UserWarning, match="78.6 PPL"):
        fb.generate("x", HashRetriever(), config=FlashBackConfig(mode="append"), max_new_tokens=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fb.generate("x", HashRetriever(), config=FlashBackConfig(mode="append"), max_new_tokens=2)  # once only


def test_framework_classes_report_the_resolved_mode(chat_path) -> None:
    from tiny import HashRetriever

    from flashback_integrations.langchain import FlashBackLLM

    llm = FlashBackLLM(model=chat_path, adapter="none", retriever=HashRetriever(), max_tokens=4)
    info = llm.generate(["The json module"]).generations[0][0].generation_info
    assert info["mode"] == "isolated" and "rotary" in info["mode_reason"] and info["backend"] == "torch"


# ----------------------------------------------------------------------------- quiet by default
def test_the_cli_prints_no_library_bars_or_warnings_unless_verbose(chat_path, tmp_path) -> None:
    import subprocess
    import sys

    args = ["generate", "The json module", "--model", chat_path, "--adapter", "none", "--max-new-tokens", "3"]
    run = [sys.executable, "-m", "flashback_integrations.cli"]
    env = {**__import__("os").environ, "FLASHBACK_HOME": str(tmp_path)}
    quiet = subprocess.run([*run, *args], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "Warning" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*run, "--verbose", *args], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0 and "mode=isolated" in loud.stderr, loud.stderr


# ----------------------------------------------------------------------------- informative records
def test_later_retrieval_queries_hold_no_chat_template_text(chat_path) -> None:
    from tiny import HashRetriever

    from flashback_integrations import FlashBackConfig

    fb = FlashBackModel.from_pretrained(chat_path, adapter="none")
    question = "How do I pretty-print JSON?"
    ids = fb.chat_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])
    cfg = FlashBackConfig(mode="isolated", stride=2, query_tokens=64)
    result = fb.generate(ids, HashRetriever(), config=cfg, max_new_tokens=6, first_query=question, ignore_eos=True)
    later = [r.query for r in result.retrievals[1:]]
    assert later and all(q.startswith(question) for q in later), later
    assert not any("assistant" in q or "system" in q or "Be brief" in q for q in later), later


def test_retrieval_records_name_their_sources(chat_path) -> None:
    from flashback_integrations import FlashBackConfig, Passage

    fb = FlashBackModel.from_pretrained(chat_path, adapter="none")

    def retriever(query, k):
        meta = {"source": "/docs/json.txt", "source_name": "json.txt", "chunk_index": 3}
        return [Passage(text="json.dumps(obj, indent=2) pretty-prints.", id="abc123", score=0.8, metadata=meta)]

    result = fb.generate("x", retriever, config=FlashBackConfig(mode="isolated", stride=4), max_new_tokens=2)
    (record,) = result.retrievals[0].payload()["passages"]
    assert record == {"id": "abc123", "source": "json.txt", "chunk_index": 3, "score": 0.8,
                      "snippet": "json.dumps(obj, indent=2) pretty-prints."}  # fmt: skip


def test_ingest_takes_the_model_or_its_name_once(tmp_path, chat_path) -> None:
    from tiny import make_sentence_transformer

    from flashback_integrations import ConfigError
    from flashback_integrations.store import Embedder, connect, ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("alpha beta gamma " * 40)
    embedder = Embedder(make_sentence_transformer(tmp_path / "st"))
    fb = FlashBackModel.from_pretrained(chat_path, adapter="none")
    by_model = ingest(connect(tmp_path / "s1"), "docs", [docs], fb, embedder=embedder, progress=False)
    by_name = ingest(connect(tmp_path / "s2"), "docs", [docs], chat_path, embedder=embedder, progress=False)
    assert by_model.chunks_total == by_name.chunks_total > 0
    meta = connect(tmp_path / "s1").get_collection("docs").metadata
    assert meta["flashback_chunk_tokenizer"] == fb.name
    with pytest.raises(ConfigError, match="model's name"):
        ingest(connect(tmp_path / "s3"), "docs", [docs], fb.tokenizer, embedder=embedder, progress=False)


def test_generate_chat_answers_the_prompt_as_a_question(chat_path) -> None:
    from typer.testing import CliRunner

    from flashback_integrations.cli import app

    args = ["generate", "What does json.dumps do?", "--chat", "--model", chat_path, "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "query='What does json.dumps do?'" in result.output  # the question, not template text, is the query
