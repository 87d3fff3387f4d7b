"""`flashback eval ppl` and the training CLI: every row on the same tokens, resumable, bootstrap
intervals and paired ratios, parallel rows merged, the isolated rows' tail.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model, save_tiny_base
from typer.testing import CliRunner

from flashback_integrations import ConfigError
from flashback_integrations.cli import app
from flashback_integrations.data import sample_corpus_dir
from flashback_integrations.training.examples import (
    ExampleSettings,
    build_examples,
    chunk_retriever,
    load_documents,
)
from flashback_integrations.training.perplexity import PplRow, bootstrap, paper_rows, run_eval
from flashback_integrations.training.scoring import (
    target_nll,
)
from flashback_integrations.training.trainer import TrainConfig, train

SETTINGS = ExampleSettings(
    context_budget=128,
    target_tokens=8,
    target_every=8,
    first_target=64,
    query_tokens=24,
    max_doc_tokens=24,
    min_window=48,
)


@pytest.fixture(scope="module")
def tok():
    return make_model("llama", marks=False)[1]


@pytest.fixture(scope="module")
def docs(tok):
    return load_documents([sample_corpus_dir()], tok)


@pytest.fixture(scope="module")
def examples(tok, docs):
    return build_examples(docs, tok, chunk_retriever(docs, tok, 32), SETTINGS, seed=0, progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    save_tiny_base(path)
    return path


def _load_base(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


FAST = dict(steps=6, batch_size=4, micro_batch_size=2, eval_every=3, save_every=2, lr=5e-3, device="cpu")


# --------------------------------------------------------------------------- evaluation
def test_bootstrap_intervals_and_paired_ratios() -> None:
    rng = torch.Generator().manual_seed(0)
    a = (torch.rand(400, generator=rng) * 4 + 30).numpy()
    stats = bootstrap({"a": a, "b": a * 1.1}, tokens_per_example=16, reference="a")
    assert stats["a"]["ci_low"] < stats["a"]["ppl"] < stats["a"]["ci_high"]
    assert stats["a"]["ratio_to_reference"] == 1.0
    assert stats["b"]["ppl"] > stats["a"]["ppl"] and stats["b"]["ratio_ci_low"] > 1.0


def test_paper_rows_name_what_is_skipped() -> None:
    rows, skipped = paper_rows("fb", None, None)
    assert [r.name for r in rows] == [
        "no retrieval",
        "prepend",
        "append",
        "append + LoRA + MT (FlashBack)",
        "isolated (untrained)",
    ]
    assert skipped == [
        "prepend + LoRA + MT",
        "append + LoRA",
        "isolated + prepend adapter",
        "isolated + adapter",
        "no retrieval + isolated adapter",
    ]


def test_eval_scores_every_row_on_the_same_tokens_and_resumes(base_dir, examples, tmp_path, monkeypatch) -> None:
    model, tok = _load_base(base_dir)
    train(model, tok, examples[:16], tmp_path / "fb", TrainConfig(**{**FAST, "steps": 2}), progress=False)
    rows, _ = paper_rows(str(tmp_path / "fb"), None, None)
    ex = examples[:12]
    result = run_eval(ex, rows, tmp_path / "out", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    assert result["scored_tokens"] == 12 * SETTINGS.target_tokens
    assert [r["name"] for r in result["rows"]] == [r.name for r in rows]
    # the no-retrieval row is exp(mean NLL) of src + tgt under the base model
    base, _ = _load_base(base_dir)
    nll = target_nll(base, ex, "none", None, tok.pad_token_id)
    assert result["rows"][0]["ppl"] == pytest.approx(float(torch.exp(nll.detach().mean())), rel=1e-4)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"ppl.{ext}").is_file()
    assert "| append + LoRA + MT (FlashBack) |" in (tmp_path / "out" / "ppl.md").read_text()

    import flashback_integrations.training.perplexity as evaluation

    def boom(*a, **k):
        raise AssertionError("finished rows must not be scored again")

    monkeypatch.setattr(evaluation, "score_row", boom)
    again = run_eval(ex, rows, tmp_path / "out", "ppl", str(base_dir), "cpu", progress=False)
    assert again["rows"] == result["rows"]


def test_eval_stopped_mid_row_resumes_from_its_last_save(base_dir, examples, tmp_path, monkeypatch) -> None:
    import flashback_integrations.training.perplexity as evaluation

    rows = [PplRow("no retrieval", "none"), PplRow("append", "append")]
    ex = examples[:12]  # batches of 5: 5 + 5 + 2 per row
    whole = run_eval(ex, rows, tmp_path / "whole", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 5:  # the second batch of the second row
            raise KeyboardInterrupt
        return target_nll(*args, **kwargs)

    monkeypatch.setattr(evaluation, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(evaluation, "target_nll", counted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(ex, rows, tmp_path / "stopped", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    saved = json.loads((tmp_path / "stopped" / "ppl.partial.json").read_text())
    assert len(saved["rows"]) == 1 and [len(v) for v in saved["in_progress"].values()] == [5]
    calls.clear()
    resumed = run_eval(ex, rows, tmp_path / "stopped", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    assert calls == [5, 2]  # only what the stopped run had not saved
    assert resumed["rows"] == whole["rows"]


def test_marks_row_without_marks_is_an_error(base_dir, examples) -> None:
    from flashback_integrations.training.perplexity import score_row

    with pytest.raises(ConfigError, match="uses marks"):
        score_row(PplRow("x", "append", None, True), examples[:2], str(base_dir), "cpu")


# --------------------------------------------------------------------------- command line
def test_cli_data_build_train_and_eval(base_dir, tmp_path) -> None:
    runner = CliRunner()
    small = [
        "--context-budget", "128", "--target-tokens", "8", "--first-target", "64", "--query-tokens", "24",
        "--max-doc-tokens", "24", "--min-window", "48", "--chunk-tokens", "32",
    ]  # fmt: skip
    common = ["--model", str(base_dir), "--docs", str(sample_corpus_dir())]
    r = runner.invoke(
        app,
        ["data", "build", str(tmp_path / "train.jsonl.gz"), *common, "--val-out", str(tmp_path / "val.jsonl.gz"),
         "--val-fraction", "0.25", *small],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["train", str(tmp_path / "adapter"), "--model", str(base_dir), "--examples", str(tmp_path / "train.jsonl.gz"),
         "--val-examples", str(tmp_path / "val.jsonl.gz"), "--steps", "3", "--batch-size", "2",
         "--micro-batch-size", "1", "--eval-every", "3", "--device", "cpu", "--bf16"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "validation loss" in r.output and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((tmp_path / "adapter" / "flashback_adapter.json").read_text())
    assert manifest["flashback_config"]["stride"] == 8 and manifest["flashback_config"]["max_doc_tokens"] == 24
    assert manifest["extra"]["training"]["train_config"]["bf16"] is True  # CPU autocast on request
    r = runner.invoke(
        app,
        ["eval", "ppl", *common, *small, "--flashback-adapter", str(tmp_path / "adapter"), "--max-examples", "6",
         "--out", str(tmp_path / "eval"), "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "eval" / "ppl.json").read_text())
    assert result["scored_tokens"] == 48 and len(result["rows"]) == 5
    assert result["rows"][-1]["name"] == "isolated (untrained)" and result["rows"][-1]["ppl"] > 0
    assert result["skipped_rows"] == [
        "prepend + LoRA + MT",
        "append + LoRA",
        "isolated + prepend adapter",
        "isolated + adapter",
        "no retrieval + isolated adapter",
    ]
    # --max-examples on an example file scores a seeded subset, and says so
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"), "--max-examples", "2",
         "--row", "no retrieval", "--out", str(tmp_path / "eval"), "--stem", "sub", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    sub = json.loads((tmp_path / "eval" / "sub.json").read_text())
    assert sub["scored_tokens"] == 16 and sub["data"]["subset"]["examples"] == 2
    # an adapter trained for the other layout is refused before anything is scored
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"),
         "--prepend-adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "eval"), "--stem", "wrong",
         "--device", "cpu"],
    )  # fmt: skip
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "trained for append" in said and "--layout prepend" in said
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"),
         "--append-adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "eval"), "--stem", "wrong"],
    )  # fmt: skip
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "no-marks row but adapter" in said and "flashback train --no-marks" in said
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"),
         "--flashback-adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "eval"), "--stem", "wrong"],
    )  # fmt: skip
    assert r.exit_code == 2 and "not an adapter directory" in " ".join(r.output.split())
    assert not list((tmp_path / "eval").glob("wrong*"))
    r = runner.invoke(app, ["train", str(tmp_path / "x"), "--model", str(base_dir), "--examples", "/nope.jsonl.gz"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["eval", "ppl", "--examples", str(tmp_path / "val.jsonl.gz"), "--row", "sideways"])
    assert r.exit_code == 2 and "Unknown row" in r.output


def test_eval_isolated_rows_read_with_the_given_tail(base_dir, examples, tmp_path) -> None:
    from flashback_integrations.training.perplexity import with_tail

    rows = with_tail([PplRow("no retrieval", "none"), PplRow("isolated (untrained)", "isolated")], 4)
    assert [r.name for r in rows] == ["no retrieval", "isolated (untrained) (tail 4)"]
    ex = examples[:6]
    result = run_eval(ex, rows, tmp_path / "out", "ppl", str(base_dir), "cpu", batch_size=3, progress=False)
    base, tok = _load_base(base_dir)
    nll = target_nll(base, ex, "isolated", None, tok.pad_token_id, tail_tokens=4)
    assert result["rows"][1]["ppl"] == pytest.approx(float(torch.exp(nll.detach().mean())), rel=1e-4)
    with pytest.raises(ConfigError, match="tail_tokens"):
        with_tail(rows, 0)


def test_eval_merges_rows_scored_in_parallel_under_another_stem(base_dir, examples, tmp_path, monkeypatch) -> None:
    import flashback_integrations.training.perplexity as evaluation

    rows = [PplRow("no retrieval", "none"), PplRow("append", "append")]
    ex = examples[:6]
    whole = run_eval(ex, rows, tmp_path, "whole", str(base_dir), "cpu", batch_size=3, progress=False)
    run_eval(ex, rows[1:], tmp_path, "second", str(base_dir), "cpu", batch_size=3, progress=False)  # in parallel
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return target_nll(*args, **kwargs)

    monkeypatch.setattr(evaluation, "target_nll", counted)
    merged = run_eval(ex, rows, tmp_path, "first", str(base_dir), "cpu", batch_size=3, progress=False,
                      merge_from=[tmp_path / "second.partial.json"])  # fmt: skip
    assert calls == [3, 3]  # only the first row was scored here
    assert merged["rows"] == whole["rows"]
    other = run_eval(examples[6:9], rows[:1], tmp_path, "other", str(base_dir), "cpu", progress=False)
    assert other["examples"] == 3
    with pytest.raises(ConfigError, match="other examples or another model"):
        run_eval(ex, rows, tmp_path, "third", str(base_dir), "cpu", progress=False,
                 merge_from=[tmp_path / "other.partial.json"])  # fmt: skip
