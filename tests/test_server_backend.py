"""The server backend against a real llama.cpp ``llama-server`` on 127.0.0.1 (started here, nothing mocked):
the torch backend's greedy tokens, the prefix cache's reuse read from the server, and clear errors.

Needs the ``llama-server`` binary (``make llama-server``); skipped without it, like the llama.cpp tests.
"""

from __future__ import annotations

import warnings

import pytest
from tiny import HashRetriever, check_stops_and_streams_like_torch, save_tiny_base, save_tiny_export

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel
from flashback_integrations.bench.servers import llama_server, llama_server_binary
from flashback_integrations.engine.constrained import Grammar
from flashback_integrations.engine.server import ServerError
from flashback_integrations.loading.export import export_gguf, export_hf

pytestmark = pytest.mark.skipif(llama_server_binary() is None, reason="llama-server not built (`make llama-server`)")

TRAINED = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)
PROMPT = "The json module dumps"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = save_tiny_export(tmp_path_factory, TRAINED)
    base = save_tiny_base(tmp_path_factory.mktemp("base"), seed=3)  # the same base without the adapter's marks
    bare = export_hf(base, "none", tmp_path_factory.mktemp("export") / "bare")
    export_gguf(bare, bare / "model.gguf", dtype="float32")
    return out, bare


@pytest.fixture(scope="module")
def server(exported):
    # one slot and no host-memory prompt cache: the server then holds one sequence, as the torch backend's cache
    # does, so their reuse must be equal (with its RAM cache llama.cpp may reuse more, never less)
    with llama_server(exported[0] / "model.gguf", threads=1, n_ctx=512, extra=["--cache-ram", "0"]) as url:
        yield url


@pytest.fixture(scope="module")
def both(exported, server):
    remote = FlashBackModel.from_pretrained(str(exported[0]), backend="openai", server_url=server)
    return FlashBackModel.from_pretrained(str(exported[0])), remote


def _run(fb: FlashBackModel, mode: str, block_offset: int = 0, **kwargs):
    config = TRAINED.replace(mode=mode, block_offset=block_offset)
    return fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=14, ignore_eos=True, **kwargs)


@pytest.mark.parametrize(("mode", "offset"), [("none", 0), ("append", 0), ("prepend", 0), ("append", 5)])
def test_the_server_gives_the_torch_backends_tokens_and_cache_costs(both, mode, offset) -> None:
    reference, remote = both  # append with offset 5: the portable variant, the block 5 tokens back
    want, got = _run(reference, mode, offset), _run(remote, mode, offset)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert [r.query for r in got.retrievals] == [r.query for r in want.retrievals]
    assert [r.block_tokens for r in got.retrievals] == [r.block_tokens for r in want.retrievals]
    # after the first retrieval the server's prefix cache keeps what the torch backend keeps, measured by
    # the server itself (llama.cpp evaluates at least the last prompt id, as the torch backend does)
    assert [r.reused_tokens for r in got.retrievals[1:]] == [r.reused_tokens for r in want.retrievals[1:]]
    assert [r.prefill_tokens for r in got.retrievals[1:]] == [r.prefill_tokens for r in want.retrievals[1:]]


def test_stop_strings_and_streaming_match_the_torch_backend(both) -> None:
    check_stops_and_streams_like_torch(*both, _run, PROMPT, TRAINED)


def test_sampling_runs_on_the_server_and_a_seed_repeats(both) -> None:
    _, remote = both
    args = {"temperature": 0.9, "top_k": 20, "seed": 7, "max_new_tokens": 10, "ignore_eos": True}
    first = remote.generate(PROMPT, HashRetriever(), config=TRAINED, **args)
    assert remote.generate(PROMPT, HashRetriever(), config=TRAINED, **args).token_ids == first.token_ids


def test_what_a_server_cannot_do_is_refused_before_any_work(both, exported, server) -> None:
    _, remote = both
    with pytest.raises(ConfigError, match="isolated"):
        remote.generate(PROMPT, HashRetriever(), config=FlashBackConfig(mode="isolated"))
    with pytest.raises(ConfigError, match="grammar"):
        remote.generate(PROMPT, HashRetriever(), grammar=Grammar.json_object(), max_new_tokens=4)
    with pytest.raises(ConfigError, match="logprobs"):
        remote.generate(PROMPT, HashRetriever(), logprobs=True, max_new_tokens=4)
    with pytest.raises(ConfigError, match="torch backend"):
        remote.generate_batch([PROMPT, PROMPT], max_new_tokens=2)
    with pytest.raises(ServerError, match="does not serve 'other'"):
        FlashBackModel.from_server(str(exported[0]), server, served_model="other")
    with pytest.raises(ConfigError, match="needs server_url"):
        FlashBackModel.from_pretrained(str(exported[0]), backend="openai")
    with pytest.raises(ConfigError, match="merged into the weights"):
        FlashBackModel.from_pretrained("default", backend="openai", server_url=server)


def test_an_unreachable_server_is_named_with_the_fix(exported) -> None:
    from flashback_integrations.store.server import free_port

    with pytest.raises(
        ServerError, match=r"cannot reach a completions server at http://127\.0\.0\.1:\d+ .*llama-server"
    ):
        FlashBackModel.from_server(str(exported[0]), f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="http"):
        FlashBackModel.from_server(str(exported[0]), "127.0.0.1:8080")


def test_a_server_without_the_marks_is_refused(exported) -> None:
    merged, bare = exported
    with llama_server(bare / "model.gguf", threads=1, n_ctx=256) as url:
        with pytest.raises(ServerError, match="without the adapter's marks|another model"):
            FlashBackModel.from_server(str(merged), url)
        plain = FlashBackModel.from_server(str(bare), url)  # its own tokenizer: fine
        assert plain.generate(PROMPT, config=FlashBackConfig(mode="none"), max_new_tokens=3, ignore_eos=True).token_ids


def test_a_server_without_prefix_caching_is_warned_about_once(exported) -> None:
    merged, _ = exported
    with llama_server(merged / "model.gguf", threads=1, n_ctx=512, extra=["--no-cache-prompt"]) as url:
        remote = FlashBackModel.from_server(str(merged), url)
        long = PROMPT + " and loads them back from text files written by another module of the library"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                remote.generate(long, HashRetriever(), config=TRAINED, max_new_tokens=14, ignore_eos=True)
        prefix = [w for w in caught if "prefix caching looks off" in str(w.message)]
        assert len(prefix) == 1


def test_framework_classes_and_cli_take_the_server(both, exported, server) -> None:
    from typer.testing import CliRunner

    from flashback_integrations.cli import app
    from flashback_integrations.langchain import FlashBackLLM

    folder = str(exported[0])
    settings = {"model": folder, "retriever": HashRetriever(), "max_tokens": 10, "stride": 4, "query_tokens": 8}
    settings.update(num_passages=1, max_doc_tokens=12)
    remote = FlashBackLLM(**settings, backend="openai", server_url=server)
    assert remote.flashback().backend.name == "openai"
    # no mode named: the export's saved layout decides, as it does for the local model
    assert remote.flashback().resolve_config(remote.flashback_config()).mode == "append"
    local = FlashBackLLM(**settings)
    assert remote.invoke(PROMPT) == local.invoke(PROMPT)
    assert remote.generate([PROMPT]).generations[0][0].generation_info["mode"] == "append"
    from flashback_integrations.llama_index import FlashBackLLM as LlamaIndexLLM

    on_server = LlamaIndexLLM(**settings, backend="openai", server_url=server)
    assert on_server.complete(PROMPT).text == LlamaIndexLLM(**settings).complete(PROMPT).text
    args = ["generate", "The json module", "--model", folder, "--backend", "openai", "--server-url", server]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "retrieval @ token 0" in result.output
