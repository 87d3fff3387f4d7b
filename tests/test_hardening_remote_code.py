"""Bad input, round 2 (issue 43), high: remote code through model_kwargs or a folder's own classes
never runs unless trust_remote_code=True is given as a real bool, in every entry point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations import ConfigError, FlashBackError, FlashBackModel
from flashback_integrations.cli import app
from flashback_integrations.config import LoadSettings

runner = CliRunner()


def said(result) -> str:
    """The CLI's output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"traceback instead of a message: {result.exception!r}"
    )
    return result


# ----------------------------------------------------------------------------- high: remote code
def _remote_code_folder(root: Path) -> tuple[Path, Path]:
    """A model folder whose own code (configuration, modeling, tokenization) writes a file when imported."""
    folder, marker = root / "remote-code-model", root / "REMOTE_CODE_RAN"
    save_tiny_chat_model(folder)
    payload = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    for module, cls, base in [
        ("configuration_evil", "EvilConfig", "LlamaConfig"),
        ("modeling_evil", "EvilModel", "LlamaForCausalLM"),
        ("tokenization_evil", "EvilTokenizer", "PreTrainedTokenizerFast"),
    ]:
        (folder / f"{module}.py").write_text(
            f"{payload}from transformers import {base}\nclass {cls}({base}):\n    pass\n"
        )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder, marker


@pytest.fixture
def remote_code(tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return _remote_code_folder(tmp_path)


def test_the_remote_code_folder_would_run_its_code_when_trusted(remote_code) -> None:
    """The control: the folder below is a real threat, so the refusals are what keep it out."""
    from transformers import AutoTokenizer

    folder, marker = remote_code
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert marker.exists()


SMUGGLED = [
    {"trust_remote_code": True},
    {"trust_remote_code": "true"},
    {"TRUST_REMOTE_CODE": True},
    {"trust-remote-code": 1},
    {" trust_remote_code": True},
    {"model_kwargs": {"trust_remote_code": True}},
]


@pytest.mark.parametrize("smuggled", SMUGGLED, ids=lambda d: repr(d)[:40])
def test_trust_remote_code_inside_model_kwargs_is_refused_everywhere(remote_code, smuggled) -> None:
    folder, marker = remote_code
    from flashback_integrations.langchain import ChatFlashBack, FlashBackLLM
    from flashback_integrations.llama_index import FlashBackLLM as LlamaIndexLLM

    entry_points = [
        lambda: FlashBackModel.from_pretrained(str(folder), trust_remote_code=False, model_kwargs=smuggled),
        lambda: FlashBackModel.from_pretrained(str(folder), model_kwargs=smuggled),
        lambda: FlashBackModel.shared(str(folder), trust_remote_code=False, model_kwargs=smuggled),
        lambda: FlashBackModel.from_pretrained(str(folder), device_map=None, model_kwargs=smuggled),
        lambda: LoadSettings(model=str(folder), model_kwargs=smuggled),
        lambda: ChatFlashBack(model=str(folder), model_kwargs=smuggled, mode="none"),
        lambda: FlashBackLLM(model=str(folder), model_kwargs=smuggled, mode="none"),
        lambda: LlamaIndexLLM(model=str(folder), model_kwargs=smuggled, mode="none"),
    ]
    for i, load in enumerate(entry_points):
        with pytest.raises((ConfigError, ValueError), match="model_kwargs|trust_remote_code"):
            load()
        assert not marker.exists(), f"entry point {i} ran the folder's code"
    result = cli("generate", "hi", "--model", str(folder), "--mode", "none", "--model-kwargs", json.dumps(smuggled))
    assert result.exit_code == 2, result.output
    assert "model_kwargs" in result.output
    assert not marker.exists(), "the CLI ran the folder's code"


@pytest.mark.parametrize("value", ["false", "no", 1, 0, None, "True"])
def test_trust_remote_code_must_be_a_real_bool(remote_code, value) -> None:
    folder, marker = remote_code
    with pytest.raises(ConfigError, match="trust_remote_code must be True or False"):
        FlashBackModel.from_pretrained(str(folder), trust_remote_code=value)
    with pytest.raises(ConfigError, match="trust_remote_code must be True or False"):
        LoadSettings(model=str(folder), trust_remote_code=value)
    assert not marker.exists()


def test_without_the_flag_the_folder_loads_with_its_builtin_classes_and_runs_nothing(remote_code) -> None:
    folder, marker = remote_code
    try:
        fb = FlashBackModel.from_pretrained(str(folder), device="cpu")
    except FlashBackError:
        pass  # refusing the folder is as good as loading it without its code
    else:
        assert type(fb.model).__module__.startswith("transformers.models.")
    result = cli("generate", "hi", "--model", str(folder), "--mode", "none", "--max-new-tokens", "2")
    assert not marker.exists(), result.output


@pytest.mark.parametrize(
    ("smuggled", "field"),
    [({"dtype": "float16"}, "dtype"), ({"torch_dtype": "float16"}, "dtype"), ({"revision": "x"}, "revision"),
     ({"Revision": "x"}, "revision"), ({"device": "cpu"}, "device"), ({"_from_auto": True}, "private")],
)  # fmt: skip
def test_model_kwargs_never_override_the_explicit_arguments(tmp_path, smuggled, field) -> None:
    with pytest.raises(ConfigError, match=field):
        LoadSettings(model=str(tmp_path), dtype="float32", model_kwargs=smuggled)
    result = cli(
        "generate", "hi", "--model", str(tmp_path), "--dtype", "float32", "--model-kwargs", json.dumps(smuggled)
    )
    assert result.exit_code == 2 and field in result.output, result.output


def test_model_kwargs_on_a_backend_without_transformers_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="backend"):
        LoadSettings(model="default", backend="llamacpp", model_kwargs={"device_map": "auto"})
    with pytest.raises(ConfigError, match="backend"):
        FlashBackModel.from_pretrained("default", backend="llamacpp", adapter="none", attn_implementation="eager")
