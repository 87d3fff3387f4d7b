"""Loading parity with HuggingFaceLLM / HuggingFacePipeline: automatic device and dtype, model_kwargs,
revision and trust_remote_code, from the API, both frameworks and the CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny import HashRetriever, make_model
from typer.testing import CliRunner

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.cli import app
from flashback_integrations.errors import ConfigError
from flashback_integrations.loading import devices

PROMPT = "The json module"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = make_model("llama", marks=False)
    path = tmp_path_factory.mktemp("tiny-loading")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _greedy(fb: FlashBackModel) -> list[int]:
    """Greedy ids with retrieval in the isolated layout, so the engine's masks and positions are used."""
    config = FlashBackConfig(mode="isolated", stride=4, max_doc_tokens=16, marks=False)
    return fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=8).token_ids


def test_no_device_means_cpu_fp32_here_and_gpu_bf16_when_there_is_one(monkeypatch) -> None:
    if not torch.cuda.is_available():
        assert devices.auto_placement(None, None) == (torch.float32, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.auto_placement(None, None) == (torch.bfloat16, torch.device("cuda"))
    assert devices.auto_placement("float32", "cpu") == (torch.float32, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.auto_placement("auto", None)[0] == torch.float16
    # with device_map accelerate places the weights: no device of our own
    assert devices.auto_placement(None, None, device_map="auto") == (torch.float16, None)


def test_loaded_model_is_on_the_automatic_device(tiny_dir) -> None:
    fb = FlashBackModel.from_pretrained(str(tiny_dir))
    dtype, device = devices.auto_placement(None, None)
    param = next(fb.model.parameters())
    assert (param.dtype, param.device.type) == (dtype, device.type)


def test_attn_implementation_reaches_the_model_and_generates_the_same(tiny_dir) -> None:
    sdpa = FlashBackModel.from_pretrained(str(tiny_dir), attn_implementation="sdpa")
    eager = FlashBackModel.from_pretrained(str(tiny_dir), attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    assert _greedy(eager) == _greedy(sdpa)


def test_device_map_loads_through_accelerate(tiny_dir) -> None:
    fb = FlashBackModel.from_pretrained(str(tiny_dir), device_map="auto")  # no GPU here: all on the CPU
    assert {p.device.type for p in fb.model.parameters()} == {"cpu"}
    assert _greedy(fb) == _greedy(FlashBackModel.from_pretrained(str(tiny_dir)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attn_implementation": "flash_attention_2"}, "eager, sdpa"),
        ({"torch_dtype": "float16"}, "pass dtype"),
        ({"device_map": "cpu", "device": "cpu"}, "not both"),
        ({"revision": ""}, "revision"),
        ({"dtype": "float64"}, "float64"),
        ({"device": "tpu9"}, "tpu9"),
    ],
)
def test_bad_loading_arguments_fail_before_loading(tiny_dir, monkeypatch, kwargs, message) -> None:
    loaded = []
    monkeypatch.setattr("flashback_integrations.loading.pretrained.load_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError, match=message):
        FlashBackModel.from_pretrained(str(tiny_dir), **kwargs)
    assert loaded == []


def test_device_map_without_accelerate_says_what_to_install(tiny_dir, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda n, *a: None if n == "accelerate" else real(n, *a))
    with pytest.raises(ConfigError, match="pip install accelerate"):
        FlashBackModel.from_pretrained(str(tiny_dir), device_map="auto")
    with pytest.raises(ConfigError, match="device or model_kwargs device_map"):
        devices.auto_placement(None, "cpu", device_map="auto")


def test_revision_and_trust_remote_code_reach_from_pretrained(tiny_dir, monkeypatch) -> None:
    calls = []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def spy(loader):
        real = loader.from_pretrained

        def load(*args, **kwargs):
            calls.append((loader.__name__, kwargs.get("revision"), kwargs.get("trust_remote_code")))
            return real(*args, **kwargs)

        return load

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(AutoTokenizer))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(AutoModelForCausalLM))
    FlashBackModel.from_pretrained(str(tiny_dir))
    FlashBackModel.from_pretrained(str(tiny_dir), revision="main", trust_remote_code=True)
    assert calls == [
        ("AutoTokenizer", None, False),
        ("AutoModelForCausalLM", None, False),
        ("AutoTokenizer", "main", True),
        ("AutoModelForCausalLM", "main", True),
    ]


def test_shared_keeps_one_model_per_loading_arguments(tiny_dir) -> None:
    a = FlashBackModel.shared(str(tiny_dir), attn_implementation="eager")
    assert FlashBackModel.shared(str(tiny_dir), attn_implementation="eager") is a
    assert FlashBackModel.shared(str(tiny_dir), attn_implementation="sdpa") is not a


def test_framework_classes_pass_loading_arguments_and_check_them_at_construction(tiny_dir) -> None:
    from flashback_integrations.langchain import ChatFlashBack
    from flashback_integrations.llama_index import FlashBackLLM

    chat = ChatFlashBack(model=str(tiny_dir), mode="none", model_kwargs={"attn_implementation": "eager"}, max_tokens=4)
    assert chat.flashback().model.config._attn_implementation == "eager"
    llm = FlashBackLLM(model=str(tiny_dir), mode="none", revision="main", max_tokens=4)
    assert llm.flashback().model.config._attn_implementation != "eager"  # its own loading arguments
    for cls in (ChatFlashBack, FlashBackLLM):
        with pytest.raises(ValueError, match="eager, sdpa"):
            cls(model=str(tiny_dir), mode="none", model_kwargs={"attn_implementation": "flash_attention_2"})
        with pytest.raises(ValueError, match="not both"):
            cls(model=str(tiny_dir), mode="none", device="cpu", model_kwargs={"device_map": "cpu"})
        with pytest.raises(ValueError, match="pass trust_remote_code=... directly"):
            cls(model=str(tiny_dir), mode="none", model_kwargs={"trust_remote_code": True})


def test_cli_model_kwargs(tiny_dir) -> None:
    runner = CliRunner()
    base = ["generate", PROMPT, "--model", str(tiny_dir), "--mode", "none", "--max-new-tokens", "4"]
    ok = runner.invoke(app, [*base, "--model-kwargs", json.dumps({"attn_implementation": "eager"})])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, [*base, "--model-kwargs", "{not json"])
    assert bad.exit_code == 2 and "--model-kwargs is not JSON" in bad.output
    refused = runner.invoke(app, [*base, "--model-kwargs", '{"attn_implementation": "flash_attention_2"}'])
    assert refused.exit_code == 2 and "eager, sdpa" in refused.output
