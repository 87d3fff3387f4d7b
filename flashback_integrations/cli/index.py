"""``flashback index``: build and inspect Chroma collections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..store.chroma import StoreLocation
from .app import console, index_app, load_tokenizer, tokenizer_label
from .options import ChunkTokens, Tokenizer, with_settings


@index_app.command("add")
@with_settings(store=StoreLocation)
def index_add(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to ingest.")],
    collection: Annotated[str, typer.Option("--collection", help="Collection name.")],
    chunk_tokens: ChunkTokens = 128,
    overlap: Annotated[int, typer.Option(help="Tokens shared by consecutive chunks.")] = 0,
    tokenizer: Tokenizer = "default",
    embedding_model: Annotated[str, typer.Option(help="sentence-transformers name or path.")] = "default",
    batch_size: Annotated[int, typer.Option(help="Chunks per embedding/write batch.")] = 64,
    *,
    store: StoreLocation,
) -> None:
    """Chunk, embed and store files; re-running adds nothing, a changed file replaces its chunks."""
    from ..store import Embedder, ingest

    report = ingest(
        store.connect(create=True),
        collection,
        paths,
        load_tokenizer(tokenizer),
        tokenizer_label(tokenizer),
        Embedder(embedding_model),
        chunk_tokens=chunk_tokens,
        overlap=overlap,
        batch_size=batch_size,
    )
    console.print(
        f"{report.files_indexed} files indexed of {report.files_seen}: {report.chunks_added} chunks added, "
        f"{report.chunks_unchanged} unchanged, {report.chunks_removed} removed; collection {collection!r} "
        f"holds {report.chunks_total} chunks ({report.seconds:.1f}s)."
    )
    for label, items in (
        ("skipped (binary)", report.skipped_binary),
        ("skipped (empty)", report.skipped_empty),
        ("not valid UTF-8, decoded with replacement", report.decoded_with_replacement),
    ):
        if items:
            more = " ..." if len(items) > 10 else ""
            console.print(f"[yellow]{len(items)} {label}:[/] " + escape(", ".join(items[:10])) + more)


@index_app.command("list")
@with_settings(store=StoreLocation)
def index_list(*, store: StoreLocation) -> None:
    """Collection names and chunk counts."""
    from ..store import collection_names, collection_stats

    client = store.connect()
    names = collection_names(client)
    if not names:
        console.print("(no collections)")
    for name in names:
        console.print(f"{name}\t{collection_stats(client, name)['chunks']} chunks")


@index_app.command("stats")
@with_settings(store=StoreLocation)
def index_stats(name: str, *, store: StoreLocation) -> None:
    """Chunks, sources and build settings of one collection."""
    from ..store import collection_stats

    stats = collection_stats(store.connect(), name)
    console.print(f"collection {escape(name)}: {stats['chunks']} chunks from {stats['sources']} sources")
    for key, value in sorted(stats["metadata"].items()):
        console.print(f"  {escape(key)}: {escape(str(value))}")


@index_app.command("delete")
@with_settings(store=StoreLocation)
def index_delete(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    *,
    store: StoreLocation,
) -> None:
    """Delete a collection and its chunks."""
    from ..store import delete_collection

    if not yes:
        typer.confirm(f"Delete collection {name!r} and all its chunks?", abort=True)
    delete_collection(store.connect(), name)
    console.print(f"deleted {name!r}")


@index_app.command("query")
@with_settings(store=StoreLocation)
def index_query(
    name: str,
    text: str,
    k: Annotated[int, typer.Option("-k", help="Results.")] = 3,
    embedding_model: Annotated[str | None, typer.Option(help="Defaults to the one that built it.")] = None,
    bm25: Annotated[bool, typer.Option("--bm25", help="BM25 over the same chunks.")] = False,
    *,
    store: StoreLocation,
) -> None:
    """Show what retrieval returns for TEXT."""
    from ..retrieval import BM25Retriever
    from ..store import ChromaRetriever, get_collection

    client = store.connect()
    if bm25:
        passages = BM25Retriever.from_collection(get_collection(client, name)).retrieve(text, k)
    else:
        passages = ChromaRetriever(name, client=client, embedding_model=embedding_model).retrieve(text, k)
    if not passages:
        console.print("(no results)")
    for i, p in enumerate(passages, 1):
        where = f"{p.metadata.get('source_name', '?')} chars {p.metadata.get('start')}-{p.metadata.get('end')}"
        console.print(f"[cyan]{i}. score {p.score:.3f}  {escape(where)}[/]")
        console.print(escape(p.text.strip()[:400]), highlight=False)
