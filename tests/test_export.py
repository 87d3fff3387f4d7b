"""``flashback export``: the merged Hugging Face checkpoint and the GGUF file give base + adapter's logits."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import HashRetriever, save_tiny_adapter, save_tiny_base
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel
from flashback_integrations.cli import app
from flashback_integrations.loading.export import EXPORT_MANIFEST, export_gguf, export_hf

TRAINED = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)
TEXT = "The json module <MARK_L> dumps and loads <MARK_R> pretty"


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    save_tiny_base(base, seed=3)
    adapter = tmp_path_factory.mktemp("adapter")
    peft_model, tokenizer = save_tiny_adapter(base, adapter, TRAINED, seed=1)
    return base, adapter, peft_model, tokenizer


def test_exported_checkpoint_gives_the_adapters_logits_and_generations(base_and_adapter, tmp_path) -> None:
    base, adapter, peft_model, tokenizer = base_and_adapter
    out = export_hf(str(base), adapter, tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert tokenizer.convert_tokens_to_ids("<MARK_L>") in ids[0].tolist()  # the marks are whole tokens
    record = json.loads((out / EXPORT_MANIFEST).read_text())
    marks = record["never_generate"]
    assert marks == tokenizer.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])
    assert record["flashback_config"]["mode"] == "append" and record["mark_tokens"] == ["<MARK_L>", "<MARK_R>"]
    with torch.no_grad():
        got, want = exported(ids).logits, peft_model(input_ids=ids).logits
    keep = [i for i in range(got.shape[-1]) if i not in marks]  # marks are never generated (masked by engines)
    assert torch.allclose(got[..., keep], want[..., keep], atol=1e-5)
    head = exported.get_output_embeddings().weight
    assert torch.equal(head[marks], torch.zeros_like(head[marks]))  # untied head: no random rows left
    # the exported folder is a FlashBack model of its own: same tokens as base + adapter, no PEFT
    want = FlashBackModel(peft_model, tokenizer).generate(
        "The json", HashRetriever(), config=TRAINED, max_new_tokens=10
    )
    got = FlashBackModel.from_pretrained(str(out)).generate(
        "The json", HashRetriever(), config=TRAINED, max_new_tokens=10
    )
    assert got.token_ids == want.token_ids


def test_gguf_export_reads_back_with_the_same_logits_and_tokens(base_and_adapter, tmp_path) -> None:
    base, adapter, _, tokenizer = base_and_adapter
    out = export_hf(str(base), adapter, tmp_path / "merged")
    path = export_gguf(out, tmp_path / "gguf" / "model.gguf", dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer(TEXT)["input_ids"]
    assert gguf_tokenizer(TEXT)["input_ids"] == ids  # marks, BOS and merges survive
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(loaded(torch.tensor([ids])).logits, exported(torch.tensor([ids])).logits, atol=1e-5)
    half = export_gguf(out, tmp_path / "gguf16" / "model.gguf")  # fp16 tensors, fp32 norms: close, not equal
    loaded16 = AutoModelForCausalLM.from_pretrained(half.parent, gguf_file=half.name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(loaded16(torch.tensor([ids])).logits, loaded(torch.tensor([ids])).logits, atol=1e-2)
    q8 = export_gguf(out, tmp_path / "gguf8" / "model.gguf", dtype="q8_0")  # llama.cpp's 8-bit blocks
    assert q8.stat().st_size < 0.6 * path.stat().st_size
    loaded8 = AutoModelForCausalLM.from_pretrained(q8.parent, gguf_file=q8.name, dtype=torch.float32)
    with torch.no_grad():
        full, eight = loaded(torch.tensor([ids])).logits, loaded8(torch.tensor([ids])).logits
    error = (eight - full).abs()  # 8-bit blocks of 32 weights: close, further than fp16
    assert error.mean() < 0.03 * full.std() and error.max() < 0.25 * full.std()


@pytest.mark.parametrize("dtype", ["q4_1", "q4_0"])
def test_4bit_gguf_keeps_the_embedding_8bit_and_reads_back_close(base_and_adapter, tmp_path, dtype) -> None:
    import gguf

    base, adapter, _, tokenizer = base_and_adapter
    out = export_hf(str(base), adapter, tmp_path / "merged")
    q8 = export_gguf(out, tmp_path / "q8" / "model.gguf", dtype="q8_0")
    q4 = export_gguf(out, tmp_path / "q4" / "model.gguf", dtype=dtype)
    assert q4.stat().st_size < q8.stat().st_size
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4).tensors}
    assert types["token_embd.weight"] == "Q8_0"  # llama.cpp's recipe: the (output) embedding stays 8-bit
    assert types["blk.0.ffn_down.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        four = AutoModelForCausalLM.from_pretrained(q4.parent, gguf_file=q4.name, dtype=torch.float32)(ids).logits
    # 4-bit blocks of 32 random weights: well off (about 20% of the logits' spread), still the same model
    correlation = torch.corrcoef(torch.stack([four.flatten(), full.flatten()]))[0, 1]
    assert correlation > 0.95, correlation


def test_export_refuses_what_it_cannot_write(base_and_adapter, tmp_path) -> None:
    base, adapter, _, _ = base_and_adapter
    activated = tmp_path / "activated"
    save_tiny_adapter(base, activated, FlashBackConfig(mode="isolated"), activated=True)
    with pytest.raises(ConfigError, match="activated adapter"):
        export_hf(str(base), activated, tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_hf(str(base), adapter, busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="dtype"):
        export_hf(str(base), adapter, tmp_path / "d", dtype="int8")
    with pytest.raises(ConfigError, match="q4_1"):  # the message lists what can be written
        export_gguf(export_hf(str(base), adapter, tmp_path / "e"), tmp_path / "e" / "model.gguf", dtype="q2_k")


def test_gguf_export_refuses_other_architectures(tmp_path) -> None:
    save_tiny_base(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(ConfigError, match="llama"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")


def test_cli_export_writes_both(base_and_adapter, tmp_path) -> None:
    base, adapter, _, _ = base_and_adapter
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "o"), "--model", str(base), "--adapter", str(adapter), "--gguf"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.gguf").is_file() and (tmp_path / "o" / "config.json").is_file()
    again = CliRunner().invoke(app, ["export", str(tmp_path / "o"), "--model", str(base), "--adapter", str(adapter)])
    assert again.exit_code == 2 and "not an empty folder" in " ".join(again.output.split())
