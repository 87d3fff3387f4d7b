"""Server mode against a real `chroma run` on 127.0.0.1 (started here, nothing mocked)."""

from __future__ import annotations

import pytest
from tiny import make_tokenizer
from typer.testing import CliRunner

from flashback_integrations import FlashBackConfig
from flashback_integrations.cli import app
from flashback_integrations.store import ChromaRetriever, Embedder, connect, ingest
from flashback_integrations.store.server import ChromaServer


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    with ChromaServer(tmp_path_factory.mktemp("chroma-server")) as address:
        yield address


def test_server_ingest_query_and_generate(chroma_server, tmp_path, llama_fb) -> None:
    host, port = chroma_server
    for name, text in {
        "a.txt": "The json module encodes Python objects as JSON text.",
        "b.txt": "asyncio.gather runs coroutines concurrently.",
    }.items():
        (tmp_path / name).write_text(text)
    client = connect(host=host, port=port)
    tok = make_tokenizer(add_bos=False)
    first = ingest(client, "server-docs", [tmp_path], tok, "tiny", Embedder(), chunk_tokens=8, progress=False)
    again = ingest(client, "server-docs", [tmp_path], tok, "tiny", Embedder(), chunk_tokens=8, progress=False)
    assert first.chunks_added == first.chunks_total > 2 and again.chunks_added == 0
    retriever = ChromaRetriever("server-docs", host=host, port=port)
    assert retriever.retrieve("JSON text encoding", 1)[0].metadata["source_name"] == "a.txt"
    out = llama_fb.generate(
        "The json module",
        retriever,
        config=FlashBackConfig(stride=4, max_doc_tokens=12),
        max_new_tokens=8,
        ignore_eos=True,
    )
    assert len(out.retrievals) == 2 and out.retrievals[0].block_tokens > 0


def test_cli_index_commands_against_the_server(chroma_server, tmp_path) -> None:
    host, port = chroma_server
    (tmp_path / "notes.md").write_text("Regular expressions match patterns; re.sub replaces matches.")
    model, tok = __import__("tiny").make_model("llama", marks=False)
    tok.save_pretrained(tmp_path / "tok")
    server = ["--chroma-host", host, "--chroma-port", str(port)]
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "index",
            "add",
            str(tmp_path / "notes.md"),
            "--collection",
            "cli-docs",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--chunk-tokens",
            "8",
            *server,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 files indexed" in result.output
    result = runner.invoke(app, ["index", "list", *server])
    assert "cli-docs" in result.output
    result = runner.invoke(app, ["index", "stats", "cli-docs", *server])
    assert "from 1 sources" in result.output and "flashback_chunk_tokens: 8" in result.output
    result = runner.invoke(app, ["index", "query", "cli-docs", "regex replace", "-k", "1", *server])
    assert result.exit_code == 0 and "notes.md" in result.output
    result = runner.invoke(app, ["index", "query", "cli-docs", "patterns matches", "--bm25", *server])
    assert result.exit_code == 0 and "notes.md" in result.output
    result = runner.invoke(app, ["index", "query", "cli-docs", "zebra", "--bm25", *server])
    assert result.exit_code == 0 and "(no results)" in result.output
    result = runner.invoke(app, ["index", "delete", "cli-docs", "--yes", *server])
    assert result.exit_code == 0
    result = runner.invoke(app, ["index", "stats", "cli-docs", *server])
    assert result.exit_code == 2 and "No collection named 'cli-docs'" in result.output


def test_cli_unreachable_server_exits_2_without_writing(tmp_path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    result = CliRunner().invoke(
        app,
        ["index", "add", str(tmp_path), "--collection", "x-docs", "--chroma-host", "127.0.0.1", "--chroma-port", "9"],
    )
    assert result.exit_code == 2 and "Cannot reach a Chroma server at 127.0.0.1:9" in result.output


def test_store_benchmark_writes_json_and_plot(tmp_path) -> None:
    import json

    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i} about json and http and asyncio " * 5)
    tok = make_tokenizer(add_bos=False)
    tok.save_pretrained(tmp_path / "tok")
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "store",
            str(tmp_path / "corpus"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--chunk-tokens",
            "16",
            "--queries",
            "5",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "store_bench.json").read_text())
    assert set(data["modes"]) == {"embedded", "server"}
    assert data["modes"]["embedded"]["chunks"] == data["modes"]["server"]["chunks"] > 3
    assert (tmp_path / "out" / "store_bench.png").stat().st_size > 1000
    for args, message in ((["--queries", "0", "-k", "0"], "--queries=0, -k=0: must be at least 1"),
                          (["--mode", "cloud"], "unknown --mode ['cloud']")):  # fmt: skip
        bad = CliRunner().invoke(app, ["bench", "store", str(tmp_path / "corpus"), *args, "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "x").exists()
