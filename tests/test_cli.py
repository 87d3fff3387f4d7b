"""The `flashback` command line on a tiny local model."""

from __future__ import annotations

import pytest
from tiny import make_model, save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations import sample_corpus_dir
from flashback_integrations.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = make_model("llama", marks=True)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generate_prints_text_and_each_retrieval(tiny_dir) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "The json module",
            "--model",
            str(tiny_dir),
            "--stride",
            "4",
            "--max-new-tokens",
            "10",
            "--max-doc-tokens",
            "16",
            "--marks",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "The json module" in result.output
    for step in (0, 4, 8):
        assert f"retrieval @ token {step}" in result.output
    assert "10 tokens" in result.output


def test_generate_with_own_corpus_and_no_retrieval(tiny_dir, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("The json module encodes Python objects as JSON text.")
    result = runner.invoke(
        app,
        [
            "generate",
            "json",
            "--model",
            str(tiny_dir),
            "-c",
            str(tmp_path),
            "--max-new-tokens",
            "3",
            "--max-doc-tokens",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "notes.txt#0" in result.output
    result = runner.invoke(
        app, ["generate", "json", "--model", str(tiny_dir), "--mode", "none", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0 and "retrieval @" not in result.output


def test_bad_settings_exit_2_with_the_reason(tiny_dir) -> None:
    result = runner.invoke(app, ["generate", "x", "--model", str(tiny_dir), "--stride", "0"])
    assert result.exit_code == 2
    assert "stride must be a positive integer" in result.output
    result = runner.invoke(app, ["generate", "x", "--model", str(tiny_dir), "--max-new-tokens", "600"])
    assert result.exit_code == 2 and "context" in result.output


def test_sample_corpus_is_packaged() -> None:
    files = sorted(p.name for p in sample_corpus_dir().glob("*.txt"))
    assert "json.txt" in files and len(files) >= 6


def test_generate_in_the_isolated_layout_and_its_refusals(tiny_dir, tmp_path) -> None:
    args = ["generate", "The json module", "--model", str(tiny_dir), "--stride", "4", "--max-new-tokens", "9"]
    result = runner.invoke(app, [*args, "--mode", "isolated", "--tail-tokens", "2", "--max-doc-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert "retrieval @ token 4" in result.output and "recomputed 6, passages" in result.output
    bad = runner.invoke(app, [*args, "--mode", "isolated", "--tail-tokens", "0"])
    assert bad.exit_code == 2 and "tail_tokens" in bad.output
    bad = runner.invoke(app, [*args, "--mode", "prepend", "--block-offset", "3"])
    assert bad.exit_code == 2 and "block_offset" in bad.output
    gpt2 = save_tiny_chat_model(tmp_path / "gpt2", arch="gpt2")
    bad = runner.invoke(app, [*args[:2], "--model", gpt2, "--mode", "isolated", "--max-new-tokens", "3"])
    assert bad.exit_code == 2 and "rotary" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(app, [*args, "--mode", "append", "--block-offset", "3", "--max-doc-tokens", "16"])
    assert ok.exit_code == 0, ok.output
