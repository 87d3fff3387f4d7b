"""A FlashBack adapter restores marks and settings, matches the PEFT model, and refuses the wrong base."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import HashRetriever, make_model, save_tiny_adapter, save_tiny_base

from flashback_integrations import (
    AdapterManifest,
    AdapterMismatchError,
    ConfigError,
    FlashBackConfig,
    FlashBackModel,
    add_mark_tokens,
    base_fingerprint,
)

TRAINED = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_tiny_base(path, seed=5)
    return path


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """What the trainer will write: LoRA on q/v plus the two trainable mark rows, via PEFT."""
    path = tmp_path_factory.mktemp("adapter")
    peft_model, tokenizer = save_tiny_adapter(base_dir, path, TRAINED)
    expected = FlashBackModel(peft_model, tokenizer).generate(
        "The json module",
        HashRetriever(),
        config=TRAINED,
        max_new_tokens=12,
        ignore_eos=True,
        output_logits=True,
    )
    return path, expected


def test_adapter_restores_marks_settings_and_outputs(base_dir, adapter_dir) -> None:
    path, expected = adapter_dir
    assert not list(path.glob("*.bin")) and list(path.glob("*.safetensors"))
    plain = FlashBackModel.from_pretrained(str(base_dir))
    assert plain.mark_ids is None
    for merge in (True, False):
        fb = FlashBackModel.from_pretrained(str(base_dir), adapter=path, merge_adapter=merge)
        assert fb.mark_ids is not None
        assert fb.config == TRAINED
        assert fb.adapter_manifest and fb.adapter_manifest.base_model == str(base_dir)
        out = fb.generate("The json module", HashRetriever(), max_new_tokens=12, ignore_eos=True)
        assert out.token_ids == expected.token_ids
        assert out.retrievals[0].block_tokens == expected.retrievals[0].block_tokens


def test_adapter_for_another_base_is_refused(adapter_dir, tmp_path) -> None:
    path, _ = adapter_dir
    other, tok = make_model("llama", marks=False, seed=99)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="trained for base model .*retrain"):
        FlashBackModel.from_pretrained(str(tmp_path / "other"), adapter=path)


def test_adapter_without_manifest_on_wrong_shapes_is_refused(adapter_dir, tmp_path) -> None:
    path, _ = adapter_dir
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for f in path.iterdir():
        if f.name != "flashback_adapter.json":
            (stripped / f.name).write_bytes(f.read_bytes())
    gpt2, tok = make_model("gpt2", marks=False)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(AdapterMismatchError, match="does not fit this base model"):
        FlashBackModel.from_pretrained(str(tmp_path / "gpt2"), adapter=stripped)


def test_not_an_adapter_directory(base_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        FlashBackModel.from_pretrained(str(base_dir), adapter=tmp_path)


def test_fingerprint_ignores_dtype_and_mark_rows(base_dir) -> None:
    fb = FlashBackModel.from_pretrained(str(base_dir))
    before = base_fingerprint(fb.model)
    add_mark_tokens(fb.model, fb.tokenizer)
    assert base_fingerprint(fb.model) == before
    assert base_fingerprint(fb.model.to(torch.bfloat16)) == before
    manifest = json.loads(json.dumps(AdapterManifest(base_model="x", base_fingerprint=before).__dict__))
    assert manifest["mark_tokens"] == ["<MARK_L>", "<MARK_R>"]
