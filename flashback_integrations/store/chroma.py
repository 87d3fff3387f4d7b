"""The Chroma-backed store: one code path for an embedded PersistentClient and a Chroma server.

Chunk ids are a hash of (source, character span, content), so ingestion is idempotent: running it
again adds nothing, a run killed half-way is completed by the next one, and a changed file gets its
new chunks written before its stale ones are deleted (a crash never loses the old version).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import setting
from ..errors import ConfigError, DiskFullError, FlashBackError, disk_full, is_disk_full
from ..loading.resolve import flashback_home, reader_tokenizer
from ..retrieval.adapt import collection_filter, read_collection
from ..retrieval.base import Passage
from ..retrieval.chunking import check_chunking, chunk_text
from ..retrieval.files import iter_files, read_text
from .embeddings import DEFAULT_EMBEDDING_MODEL, Embedder

META_EMBEDDING = "flashback_embedding_model"
META_DIM = "flashback_embedding_dim"
META_CHUNK_TOKENS = "flashback_chunk_tokens"
META_OVERLAP = "flashback_chunk_overlap"
META_TOKENIZER = "flashback_chunk_tokenizer"


class StoreError(FlashBackError, RuntimeError):
    """The store cannot do what was asked: unknown collection, unreachable server, wrong embedding."""


@dataclass(frozen=True)
class StoreLocation:
    """Where the Chroma store is: an embedded folder, or a server."""

    persist_dir: Path | None = setting(None, "Embedded store folder (default: $FLASHBACK_HOME/chroma).")
    chroma_host: str | None = setting(None, "Use a Chroma server at this host.")
    chroma_port: int = setting(8000, "Chroma server port.")

    def connect(self, create: bool = False) -> Any:
        """A client; only commands that write (``index add``, the demo) may create an embedded folder."""
        return connect(self.persist_dir, self.chroma_host, self.chroma_port, create=create)


DISK_RESERVE_BYTES = 32 * 2**20
"""Free space an embedded store keeps: Chroma needs room to apply its log even to answer a read, so a
write that would leave less than this stops first and the store stays readable."""


def _store_folder(client: Any) -> Path | None:
    """The folder of an embedded client; None for a server (its disk is the server's business)."""
    try:
        settings = client.get_settings()
    except Exception:  # noqa: BLE001 - a duck-typed client without settings
        return None
    return Path(settings.persist_directory) if getattr(settings, "is_persistent", False) else None


def _batch_bytes(texts: Sequence[str], dim: int) -> int:
    """A generous estimate of what one write costs on disk: the text in the log, the documents table and
    its full-text index, and the vector in the log and the HNSW segment."""
    return sum(4 * len(t.encode("utf-8", "replace")) + 12 * dim + 1024 for t in texts)


def _check_room(folder: Path | None, texts: Sequence[str], dim: int, written: int) -> None:
    if folder is None:
        return
    need = _batch_bytes(texts, dim) + DISK_RESERVE_BYTES
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskFullError(
            f"the disk of {folder} is nearly full: {free / 2**20:.0f} MiB free, the next batch and the room Chroma "
            f"needs to stay readable take {need / 2**20:.0f} MiB. Stopped before writing; the {written} chunks "
            "this run wrote are kept. Free some space and run the same command again: it resumes where it stopped."
        )


def store_failure(exc: Exception, what: str, folder: Path | None = None) -> FlashBackError:
    """Chroma's internal errors as one line naming the fix: a full disk, or a damaged store folder."""
    if is_disk_full(exc) or (folder is not None and shutil.disk_usage(folder).free < DISK_RESERVE_BYTES):
        return disk_full(folder or "the store", what, "free some space and run it again (the store resumes)")
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    where = f" at {folder}" if folder is not None else ""
    return StoreError(
        f"the Chroma store{where} failed while {what} ({type(exc).__name__}: {first}). If the disk is fine, the "
        "store is damaged: rebuild it with `flashback index add` into a new --persist-dir (the files are the source)."
    )


def default_persist_dir() -> Path:
    """``$FLASHBACK_HOME/chroma`` (the user cache directory unless ``FLASHBACK_HOME`` is set)."""
    return flashback_home() / "chroma"


def connect(
    persist_dir: str | Path | None = None, host: str | None = None, port: int = 8000, create: bool = True
) -> Any:
    """An embedded ``PersistentClient`` at ``persist_dir``, or an ``HttpClient`` when ``host`` is given.

    ``create=False`` (commands that only read) refuses a folder that does not exist instead of making one."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host is not None:
        if persist_dir is not None:
            raise ConfigError("Give either a persist directory (embedded) or a host (server), not both.")
        try:
            client = chromadb.HttpClient(host=host, port=port, settings=settings)
            client.heartbeat()
        except Exception as exc:  # noqa: BLE001 - chromadb raises ValueError or httpx errors
            raise StoreError(
                f"Cannot reach a Chroma server at {host}:{port} ({type(exc).__name__}: {exc}). Start one with "
                f"`chroma run --path DIR --host {host} --port {port}` or use the embedded store (--persist-dir)."
            ) from exc
        return client
    path = Path(persist_dir).expanduser() if persist_dir is not None else default_persist_dir()
    if path.exists() and not path.is_dir():
        raise StoreError(f"persist dir {path} is a file, not a folder; pass a folder for the embedded store.")
    if not path.exists():
        if not create:
            raise StoreError(f"no store at {path}; check --persist-dir, or create one with `flashback index add`.")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store folder {path} ({exc.strerror}); pass a writable --persist-dir."
            ) from exc
    if not os.access(path, os.R_OK | os.X_OK):
        raise StoreError(f"store folder {path} is not readable by this user; fix its permissions or pass another.")
    if not os.access(path, os.W_OK):
        raise StoreError(
            f"store folder {path} is read-only; Chroma's embedded store writes to its database even to read. "
            "Copy it somewhere writable, or serve it with `chroma run` and use --chroma-host."
        )
    try:
        return chromadb.PersistentClient(path=str(path), settings=settings)
    except Exception as exc:  # noqa: BLE001 - chromadb raises many types for a damaged folder
        raise StoreError(
            f"cannot open the Chroma store at {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "is it a Chroma folder of a compatible version?"
        ) from exc


def collection_names(client: Any) -> list[str]:
    return sorted(c if isinstance(c, str) else c.name for c in client.list_collections())


def get_collection(client: Any, name: str) -> Any:
    """An existing collection, or an error that lists the ones there are."""
    from chromadb.errors import ChromaError, NotFoundError

    try:
        return client.get_collection(name, embedding_function=None)
    except (NotFoundError, ValueError) as exc:
        existing = collection_names(client)
        raise StoreError(
            f"No collection named {name!r}. Existing collections: {', '.join(existing) or '(none)'}. "
            "Create it with `flashback index add PATH --collection NAME`."
        ) from exc
    except ChromaError as exc:
        raise store_failure(exc, f"opening collection {name!r}", _store_folder(client)) from exc


def check_embedding(collection: Any, embedder: Embedder) -> None:
    """Refuse to query or extend a collection with another embedding model than the one that built it."""
    meta = collection.metadata or {}
    built_with = meta.get(META_EMBEDDING)
    if built_with is not None and built_with != embedder.name:
        raise StoreError(
            f"Collection {collection.name!r} was built with embedding model {built_with!r}, not "
            f"{embedder.name!r}: vectors from different models are not comparable. Pass "
            f"embedding_model={built_with!r}, or rebuild the collection."
        )


def chunk_id(source: str, start: int, end: int, text: str) -> str:
    return hashlib.sha256(f"{source}\0{start}:{end}\0{text}".encode()).hexdigest()[:32]


@dataclass
class IngestReport:
    files_seen: int = 0
    files_indexed: int = 0
    skipped_binary: list[str] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)
    decoded_with_replacement: list[str] = field(default_factory=list)
    chunks_added: int = 0
    chunks_unchanged: int = 0
    chunks_removed: int = 0
    chunks_total: int = 0
    seconds: float = 0.0


def ingest(
    client: Any,
    collection_name: str,
    paths: Sequence[str | Path],
    tokenizer: Any,
    tokenizer_name: str | None = None,
    embedder: Embedder | None = None,
    chunk_tokens: int = 128,
    overlap: int = 0,
    batch_size: int = 64,
    on_file: Callable[[Path, IngestReport], None] | None = None,
    progress: bool = True,
    follow_symlinks: bool = False,
) -> IngestReport:
    """Chunk, embed and write ``paths`` into ``collection_name``; safe to re-run and to interrupt.

    ``tokenizer`` sizes the chunks in the reader's tokens: a ``FlashBackModel``, a model name (``"default"``,
    a hub id, a folder) or a tokenizer (then ``tokenizer_name`` records which, in the collection's settings)."""
    import time

    if tokenizer_name is not None and not isinstance(tokenizer_name, str):
        raise ConfigError(f"tokenizer_name must be the reader model's name, got a {type(tokenizer_name).__name__}; "
                          "pass an Embedder as embedder=....")  # fmt: skip
    tokenizer, tokenizer_name = reader_tokenizer(tokenizer, tokenizer_name)
    started = time.perf_counter()
    check_chunking(chunk_tokens, overlap)  # before the collection exists: its metadata records these
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (chunks per write), got {batch_size!r}.")
    embedder = embedder or Embedder(DEFAULT_EMBEDDING_MODEL)
    files = iter_files(paths, follow_symlinks)
    settings = {
        META_EMBEDDING: embedder.name,
        META_DIM: embedder.dimension,
        META_CHUNK_TOKENS: chunk_tokens,
        META_OVERLAP: overlap,
        META_TOKENIZER: tokenizer_name,
    }
    from chromadb.errors import InvalidArgumentError

    try:
        collection = client.get_or_create_collection(
            collection_name, embedding_function=None, metadata={**settings, "hnsw:space": "cosine"}
        )
    except (InvalidArgumentError, ValueError) as exc:  # Chroma's own name rules, checked before any write
        raise ConfigError(
            f"Chroma refuses the collection name {collection_name!r}: {exc}. Choose a name of 3-512 letters, "
            "digits, '.', '_' or '-' that starts and ends with a letter or digit."
        ) from exc
    check_embedding(collection, embedder)
    meta = collection.metadata or {}
    for key in (META_CHUNK_TOKENS, META_OVERLAP, META_TOKENIZER):
        if key in meta and meta[key] != settings[key]:
            raise ConfigError(
                f"Collection {collection_name!r} was built with {key.removeprefix('flashback_')}={meta[key]!r}, "
                f"this run asks for {settings[key]!r}. Use the same settings or another collection."
            )
    report = IngestReport()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[chunks]} chunks"),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task("ingesting files", total=len(files), chunks=0)
        for path in files:
            report.files_seen += 1
            try:
                _ingest_file(client, collection, path, tokenizer, embedder, chunk_tokens, overlap, batch_size, report)
            except FlashBackError:
                raise
            except Exception as exc:
                from chromadb.errors import ChromaError

                if isinstance(exc, (ChromaError, OSError)) or is_disk_full(exc):
                    raise store_failure(exc, f"ingesting {path}", _store_folder(client)) from exc
                raise
            bar.update(task, advance=1, chunks=report.chunks_added + report.chunks_unchanged)
            if on_file is not None:
                on_file(path, report)
    report.chunks_total = collection.count()
    report.seconds = time.perf_counter() - started
    return report


def _ingest_file(client, collection, path, tokenizer, embedder, chunk_tokens, overlap, batch_size, report) -> None:
    source = str(path.resolve())
    text, status = read_text(path)
    if text is None:
        (report.skipped_binary if status == "binary" else report.skipped_empty).append(source)
        existing: list[str] = collection.get(where={"source": source}, include=[])["ids"]
        if existing:  # the file became empty or binary: its old chunks no longer describe it
            collection.delete(ids=existing)
            report.chunks_removed += len(existing)
        return
    if status == "replaced":
        report.decoded_with_replacement.append(source)
    chunks = chunk_text(text, tokenizer, chunk_tokens, overlap)
    ids = [chunk_id(source, c.start, c.end, c.text) for c in chunks]
    existing = set(collection.get(where={"source": source}, include=[])["ids"])
    todo = [(i, c) for i, c in zip(ids, chunks, strict=True) if i not in existing]
    folder = _store_folder(client)
    for begin in range(0, len(todo), batch_size):
        batch = todo[begin : begin + batch_size]
        _check_room(folder, [c.text for _, c in batch], embedder.dimension, report.chunks_added + begin)
        collection.upsert(
            ids=[i for i, _ in batch],
            embeddings=embedder.embed_documents([c.text for _, c in batch]),
            documents=[c.text for _, c in batch],
            metadatas=[
                {
                    "source": source,
                    "source_name": path.name,
                    "chunk_index": c.index,
                    "start": c.start,
                    "end": c.end,
                }
                for _, c in batch
            ],
        )
    stale = sorted(existing - set(ids))
    if stale:  # written after the new chunks, so an interruption never leaves the file missing
        collection.delete(ids=stale)
    report.files_indexed += 1
    report.chunks_added += len(todo)
    report.chunks_unchanged += len(ids) - len(todo)
    report.chunks_removed += len(stale)


def collection_stats(client: Any, name: str) -> dict[str, Any]:
    from chromadb.errors import ChromaError

    collection = get_collection(client, name)
    try:
        count = collection.count()
        sources: set[str] = set()
        offset, page = 0, 5000
        while offset < count:
            got = collection.get(include=["metadatas"], limit=page, offset=offset)
            sources.update(str(m.get("source")) for m in got["metadatas"] if m)
            offset += page
    except ChromaError as exc:
        raise store_failure(exc, f"reading collection {name!r}", _store_folder(client)) from exc
    return {
        "name": name,
        "chunks": count,
        "sources": len(sources),
        "metadata": dict(collection.metadata or {}),
    }


def delete_collection(client: Any, name: str) -> None:
    get_collection(client, name)  # a clear error for an unknown name
    client.delete_collection(name)


class ChromaRetriever:
    """The engine's retriever protocol over a Chroma collection (ours or one a user already has).

    ``where`` is a Chroma metadata filter; ``exclude_source`` drops chunks of those sources (paths),
    so evaluation and training never retrieve from the document being scored.
    """

    def __init__(
        self,
        collection: str | Any,
        client: Any | None = None,
        persist_dir: str | Path | None = None,
        host: str | None = None,
        port: int = 8000,
        embedding_model: str | Embedder | None = None,
        where: dict[str, Any] | None = None,
        exclude_source: str | Path | Sequence[str | Path] | None = None,
    ) -> None:
        if isinstance(collection, str):
            client = client if client is not None else connect(persist_dir, host, port, create=False)
            collection = get_collection(client, collection)
        self.collection = collection
        meta = collection.metadata or {}
        if isinstance(embedding_model, Embedder):
            self.embedder = embedding_model
        else:
            self.embedder = Embedder(embedding_model or meta.get(META_EMBEDDING) or DEFAULT_EMBEDDING_MODEL)
        check_embedding(collection, self.embedder)
        self.where = where
        if exclude_source is None:
            excluded: list[str] = []
        elif isinstance(exclude_source, (str, Path)):
            excluded = [exclude_source]  # type: ignore[list-item]
        else:
            excluded = list(exclude_source)  # type: ignore[arg-type]
        self.exclude_source = {str(Path(s).resolve()) if Path(s).exists() else str(s) for s in excluded}

    def _filter(self) -> dict[str, Any] | None:
        return collection_filter(self.where, self.exclude_source)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k (passages to retrieve) must be a positive integer, got {k!r}.")
        from chromadb.errors import ChromaError, InvalidArgumentError

        try:
            return self._retrieve(query, k)
        except ChromaError as exc:
            if isinstance(exc, InvalidArgumentError) and "dimension" in str(exc):
                raise StoreError(
                    f"Collection {self.collection.name!r} holds vectors of another size than "
                    f"{self.embedder.name!r} makes ({exc}). Pass the embedding model that built it."
                ) from exc
            raise store_failure(exc, f"querying collection {self.collection.name!r}") from exc

    def _retrieve(self, query: str, k: int) -> list[Passage]:
        if self.collection.count() == 0:
            raise StoreError(
                f"Collection {self.collection.name!r} is empty; add documents with "
                f"`flashback index add PATH --collection {self.collection.name}`."
            )
        got = self.collection.query(
            query_embeddings=[self.embedder.embed_query(query)],
            n_results=k,
            where=self._filter(),
            include=["documents", "metadatas", "distances"],
        )
        return [
            Passage(text=doc or "", id=cid, score=1.0 - float(dist), metadata=dict(meta or {}))
            for cid, doc, meta, dist in zip(
                got["ids"][0], got["documents"][0], got["metadatas"][0], got["distances"][0], strict=True
            )
        ]

    def all_chunks(self, page: int = 5000) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """Every (id, text, metadata) that passes the filters, e.g. to build BM25 over the same chunks."""
        return read_collection(self.collection, self._filter(), page)
