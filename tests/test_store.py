"""The Chroma store: ingestion (idempotent, interruptible), filters, errors, and the engine on top."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import make_sentence_transformer, make_tokenizer

from flashback_integrations import BM25Retriever, ConfigError, FlashBackConfig
from flashback_integrations.store import (
    ChromaRetriever,
    Embedder,
    StoreError,
    collection_names,
    connect,
    get_collection,
    ingest,
)
from flashback_integrations.store.chroma import collection_stats

CFG = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=2, max_doc_tokens=12, marks=True)
TOPICS = {
    "json.md": "The json module encodes Python objects as JSON text. json.dumps returns a string and "
    "json.loads parses JSON text back into dictionaries and lists. Pass indent=2 to pretty-print.",
    "http.txt": "The http.server module serves files over HTTP. Run python -m http.server 8000 to serve the "
    "current directory. Subclass BaseHTTPRequestHandler to answer requests yourself.",
    "re.rst": "The re module matches regular expressions. re.search finds a match anywhere and re.sub "
    "replaces matches. Compile a pattern once with re.compile when it is used many times.",
    "sub/asyncio.txt": "asyncio runs coroutines concurrently. asyncio.gather waits for several coroutines "
    "and asyncio.run starts the event loop. Use asyncio.to_thread for blocking calls.",
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(add_bos=False)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def write_corpus(root: Path) -> Path:
    for name, text in TOPICS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "image.bin").write_bytes(b"\x89PNG\0\0\x01binary")
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me: the json module in French".encode("latin-1"))
    (root / ".hidden.txt").write_text("not indexed")
    return root


def do_ingest(client, name, paths, tokenizer, embedder, **kw):
    return ingest(client, name, paths, tokenizer, "tiny", embedder, chunk_tokens=16, progress=False, **kw)


def test_ingest_reports_skips_and_keeps_spans(tmp_path, tokenizer, embedder) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    client = connect(tmp_path / "db")
    report = do_ingest(client, "docs", [corpus], tokenizer, embedder)
    assert report.files_seen == 7 and report.files_indexed == 5
    assert [Path(p).name for p in report.skipped_binary] == ["image.bin"]
    assert [Path(p).name for p in report.skipped_empty] == ["empty.txt"]
    assert [Path(p).name for p in report.decoded_with_replacement] == ["latin1.txt"]
    assert report.chunks_added == report.chunks_total > len(TOPICS)
    got = get_collection(client, "docs").get(include=["documents", "metadatas"])
    for doc, meta in zip(got["documents"], got["metadatas"], strict=True):
        source = Path(meta["source"]).read_bytes().decode("utf-8", errors="replace")
        assert source[meta["start"] : meta["end"]] == doc
    assert "hidden" not in " ".join(got["documents"])
    stats = collection_stats(client, "docs")
    assert stats["sources"] == 5 and stats["metadata"]["flashback_embedding_model"] == embedder.name


def test_reingest_adds_nothing_and_changed_files_replace_their_chunks(tmp_path, tokenizer, embedder) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    client = connect(tmp_path / "db")
    first = do_ingest(client, "docs", [corpus], tokenizer, embedder)
    again = do_ingest(client, "docs", [corpus], tokenizer, embedder)
    assert again.chunks_added == 0 and again.chunks_unchanged == first.chunks_added
    assert again.chunks_total == first.chunks_total
    (corpus / "json.md").write_text("Totally new text about the pickle module and its protocols.")
    changed = do_ingest(client, "docs", [corpus], tokenizer, embedder)
    assert changed.chunks_added >= 1 and changed.chunks_removed >= 1
    col = get_collection(client, "docs")
    docs = col.get(where={"source": str((corpus / "json.md").resolve())})["documents"]
    assert "".join(docs).startswith("Totally new text") and "json.dumps" not in "".join(docs)
    (corpus / "json.md").write_text("")
    emptied = do_ingest(client, "docs", [corpus], tokenizer, embedder)
    assert not col.get(where={"source": str((corpus / "json.md").resolve())})["ids"]
    assert emptied.chunks_total == changed.chunks_total - len(docs)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from tiny import make_tokenizer
    from flashback_integrations.store import Embedder, connect, ingest

    def on_file(path, report):
        print("FILE", report.files_seen, flush=True)

    ingest(connect({db!r}), "docs", [{corpus!r}], make_tokenizer(add_bos=False), "tiny", Embedder(),
           chunk_tokens=16, batch_size=2, progress=False, on_file=on_file)
    print("DONE", flush=True)
    """
)


def test_sigkill_halfway_then_rerun_ends_like_an_uninterrupted_run(tmp_path, tokenizer, embedder) -> None:
    corpus = tmp_path / "corpus"
    for i in range(12):
        (corpus / f"d{i:02}.txt").parent.mkdir(parents=True, exist_ok=True)
        (corpus / f"d{i:02}.txt").write_text(" ".join(f"{TOPICS['json.md']} part {i} word{j}" for j in range(4)))
    script = tmp_path / "ingest.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), db=str(tmp_path / "db"), corpus=str(corpus)))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("FILE 4"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    client = connect(tmp_path / "db")
    partial = get_collection(client, "docs").count()
    resumed = do_ingest(client, "docs", [corpus], tokenizer, embedder, batch_size=2)
    reference = do_ingest(connect(tmp_path / "ref"), "docs", [corpus], tokenizer, embedder)
    assert 0 < partial < reference.chunks_total
    assert resumed.chunks_total == reference.chunks_total
    got = get_collection(client, "docs").get(include=["metadatas"])
    spans = [(m["source"], m["start"], m["end"]) for m in got["metadatas"]]
    assert len(spans) == len(set(spans)) == reference.chunks_total


def test_chroma_retriever_filters_and_feeds_the_engine(tmp_path, tokenizer, embedder, llama_fb) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    client = connect(tmp_path / "db")
    do_ingest(client, "docs", [corpus], tokenizer, embedder)
    retriever = ChromaRetriever("docs", client=client)
    top = retriever.retrieve("how do I pretty-print JSON", 2)
    assert Path(top[0].metadata["source"]).name == "json.md" and top[0].score > top[1].score
    no_json = ChromaRetriever("docs", client=client, exclude_source=corpus / "json.md")
    assert all(Path(p.metadata["source"]).name != "json.md" for p in no_json.retrieve("json dumps loads", 5))
    only_re = ChromaRetriever("docs", client=client, where={"source_name": "re.rst"})
    assert {p.metadata["source_name"] for p in only_re.retrieve("json", 3)} == {"re.rst"}
    out = llama_fb.generate("The json module", retriever, config=CFG, max_new_tokens=9, ignore_eos=True)
    assert len(out.retrievals) == 3 and all(len(r.passages) == 2 for r in out.retrievals)
    bm25 = BM25Retriever.from_collection(get_collection(client, "docs"), exclude_source=[corpus / "json.md"])
    hits = bm25.retrieve("json module dumps", 3)
    assert hits and all(h.metadata["source_name"] != "json.md" for h in hits)
    out = llama_fb.generate("The json module", bm25, config=CFG, max_new_tokens=5, ignore_eos=True)
    assert out.retrievals[0].passages


def test_errors_unknown_collection_empty_collection_and_embedding_mismatch(tmp_path, tokenizer, embedder) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    client = connect(tmp_path / "db")
    do_ingest(client, "docs", [corpus], tokenizer, embedder)
    with pytest.raises(StoreError, match=r"No collection named 'nope'.*Existing collections: docs"):
        ChromaRetriever("nope", client=client)
    client.get_or_create_collection("empty-one", embedding_function=None)
    with pytest.raises(StoreError, match="is empty"):
        ChromaRetriever("empty-one", client=client).retrieve("json", 1)
    other = make_sentence_transformer(tmp_path / "other-st")
    with pytest.raises(StoreError, match="was built with embedding model .*all-MiniLM-L6-v2"):
        ChromaRetriever("docs", client=client, embedding_model=other)
    with pytest.raises(StoreError, match="was built with embedding model"):
        do_ingest(client, "docs", [corpus], tokenizer, Embedder(other))
    foreign = client.get_or_create_collection("foreign", embedding_function=None)  # built by someone else
    foreign.add(ids=["a"], embeddings=[[0.1] * 384], documents=["x"])
    with pytest.raises(StoreError, match="vectors of another size"):
        ChromaRetriever(foreign, embedding_model=other).retrieve("json", 1)
    # bad settings or names fail before a collection exists, so a corrected rerun is not blocked by it
    before = set(collection_names(client))
    with pytest.raises(ConfigError, match="chunk_tokens must be positive"):
        ingest(client, "fresh", [corpus], tokenizer, "tiny", embedder, chunk_tokens=0, progress=False)
    with pytest.raises(ConfigError, match="Chroma refuses the collection name 'x'"):
        do_ingest(client, "x", [corpus], tokenizer, embedder)
    assert set(collection_names(client)) == before
    assert do_ingest(client, "fresh", [corpus], tokenizer, embedder).chunks_added > 0
    assert get_collection(client, "docs").count() > 0  # nothing was lost on the way


def test_langchain_and_llamaindex_retrievers_feed_the_engine(tmp_path, llama_fb) -> None:
    from langchain_chroma import Chroma
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.vector_stores.chroma import ChromaVectorStore

    client = connect(tmp_path / "db")
    texts = list(TOPICS.values())
    lc_store = Chroma.from_texts(
        texts,
        embedding=DeterministicFakeEmbedding(size=16),
        client=client,
        collection_name="lc-docs",
        metadatas=[{"name": n} for n in TOPICS],
    )
    out = llama_fb.generate(
        "The json module", lc_store.as_retriever(search_kwargs={"k": 3}), config=CFG, max_new_tokens=6, ignore_eos=True
    )
    assert [len(r.passages) for r in out.retrievals] == [2, 2]  # cut to num_passages
    assert all(p.text in texts and "name" in p.metadata for r in out.retrievals for p in r.passages)

    store = ChromaVectorStore(chroma_collection=client.get_or_create_collection("li-docs"))
    index = VectorStoreIndex.from_documents(
        [Document(text=t, metadata={"name": n}) for n, t in TOPICS.items()],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=MockEmbedding(embed_dim=8),
    )
    li_retriever = index.as_retriever(similarity_top_k=2, embed_model=MockEmbedding(embed_dim=8))
    out = llama_fb.generate("The json module", li_retriever, config=CFG, max_new_tokens=6, ignore_eos=True)
    assert all(len(r.passages) == 2 and r.passages[0].id for r in out.retrievals)
    assert all(p.text in texts for r in out.retrievals for p in r.passages)


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match=r"Cannot reach a Chroma server at 127\.0\.0\.1:9\b"):
        connect(host="127.0.0.1", port=9)


def test_two_concurrent_ingestions_of_one_collection_end_like_one_run(tmp_path, tokenizer, embedder) -> None:
    """Two writers on one collection at once (as two `index add` runs would be): the same chunks as a
    single run, none twice."""
    import threading

    corpus = tmp_path / "corpus"
    for i in range(8):
        (corpus / f"d{i:02}.txt").parent.mkdir(parents=True, exist_ok=True)
        (corpus / f"d{i:02}.txt").write_text(" ".join(f"{TOPICS['json.md']} part {i} word{j}" for j in range(3)))
    client = connect(tmp_path / "db")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            do_ingest(client, "docs", [corpus], tokenizer, embedder, batch_size=3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reference = do_ingest(connect(tmp_path / "ref"), "docs", [corpus], tokenizer, embedder)
    got = get_collection(client, "docs").get(include=["metadatas"])
    spans = sorted((m["source"], m["start"], m["end"]) for m in got["metadatas"])
    ref = get_collection(connect(tmp_path / "ref"), "docs").get(include=["metadatas"])
    assert spans == sorted((m["source"], m["start"], m["end"]) for m in ref["metadatas"])
    assert len(spans) == len(set(spans)) == reference.chunks_total
