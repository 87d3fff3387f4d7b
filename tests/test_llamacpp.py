"""The llama.cpp backend: the same loop on a GGUF, with the torch backend's tokens and cache arithmetic.

Needs ``llama-cpp-python`` (the optional ``llamacpp`` extra, compiled on install); skipped without it.
"""

from __future__ import annotations

import builtins

import pytest
import torch
from tiny import HashRetriever, save_tiny_base, save_tiny_export

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel, TokenEvent
from flashback_integrations.loading.export import export_gguf, export_hf

TRAINED = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_tiny_export(tmp_path_factory, TRAINED)


@pytest.fixture(scope="module")
def both(exported):
    pytest.importorskip("llama_cpp")
    return FlashBackModel.from_pretrained(str(exported)), FlashBackModel.from_gguf(str(exported), n_threads=1)


def _run(fb: FlashBackModel, mode: str, prompt: str = "The json module dumps") -> tuple[list, list, object]:
    events = list(
        fb.stream(
            prompt, HashRetriever(), config=TRAINED.replace(mode=mode), max_new_tokens=14, ignore_eos=True,
            output_logits=True,
        )
    )  # fmt: skip
    logits = [e.logits for e in events if isinstance(e, TokenEvent)]
    return logits, [e for e in events if isinstance(e, TokenEvent)], events[-1].result


@pytest.mark.parametrize("mode", ["none", "append", "prepend"])
def test_llamacpp_gives_the_torch_backends_tokens_logits_and_cache_costs(both, mode) -> None:
    reference, cpp = both
    want_logits, _, want = _run(reference, mode)
    got_logits, _, got = _run(cpp, mode)
    assert got.token_ids == want.token_ids
    for a, b in zip(got_logits, want_logits, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2)  # fp32 weights; llama.cpp keeps its KV cache in fp16
    # after the first retrieval, the same crop and re-feed; the first may reuse an earlier call's prompt
    assert [r.prefill_tokens for r in got.retrievals[1:]] == [r.prefill_tokens for r in want.retrievals[1:]]
    assert [r.reused_tokens for r in got.retrievals[1:]] == [r.reused_tokens for r in want.retrievals[1:]]
    if got.retrievals:
        assert got.retrievals[0].prefill_tokens <= want.retrievals[0].prefill_tokens


def test_a_second_call_reuses_the_first_calls_cache(both) -> None:
    _, cpp = both
    first = cpp.generate("The json module dumps", max_new_tokens=6, config=TRAINED.replace(mode="none"))
    again = cpp.generate("The json module dumps", max_new_tokens=6, config=TRAINED.replace(mode="none"))
    assert again.token_ids == first.token_ids
    assert again.forward_tokens < first.forward_tokens  # the prompt came from llama.cpp's cache
    assert again.forward_tokens == len(again.token_ids)  # only the last prompt id and each new token


def test_what_llamacpp_cannot_do_is_refused_before_any_work(both, exported, tmp_path) -> None:
    _, cpp = both
    with pytest.raises(ConfigError, match="isolated"):
        cpp.generate("x", HashRetriever(), config=FlashBackConfig(mode="isolated"))
    with pytest.raises(ConfigError, match="torch backend"):
        cpp.generate_batch(["x", "y"], max_new_tokens=2)
    save_tiny_base(tmp_path / "base", seed=3)
    bare = export_hf(str(tmp_path / "base"), "none", tmp_path / "bare")  # no adapter: no marks in this GGUF...
    export_gguf(bare, bare / "model.gguf", dtype="float32")
    with pytest.raises(ConfigError, match="not the same model"):  # ...so the marked tokenizer does not fit it
        FlashBackModel.from_gguf(str(exported), gguf=bare / "model.gguf")


def test_without_llama_cpp_the_error_says_how_to_install(exported, monkeypatch) -> None:
    real = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("no llama_cpp")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(ConfigError, match=r"\[llamacpp\]"):
        FlashBackModel.from_gguf(str(exported))


def test_framework_classes_and_cli_take_the_backend(both, exported) -> None:
    from typer.testing import CliRunner

    from flashback_integrations.cli import app
    from flashback_integrations.langchain import FlashBackLLM

    settings = {"model": str(exported), "retriever": HashRetriever(), "max_tokens": 10, "stride": 4, "query_tokens": 8}
    settings.update(num_passages=1, max_doc_tokens=12)
    on_cpp = FlashBackLLM(**settings, backend="llamacpp")
    assert on_cpp.flashback().backend.name == "llamacpp" and on_cpp.flashback_config().mode == "append"
    assert on_cpp.invoke("The json module dumps") == FlashBackLLM(**settings).invoke("The json module dumps")
    result = CliRunner().invoke(
        app, ["generate", "The json module", "--model", str(exported), "--backend", "llamacpp", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "retrieval @ token 0" in result.output
