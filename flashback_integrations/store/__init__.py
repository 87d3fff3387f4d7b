"""Chroma-backed retrieval: ingestion, embedded or server storage, and retrievers for the engine."""

from ..retrieval.chunking import Chunk, chunk_text
from .chroma import (
    ChromaRetriever,
    IngestReport,
    StoreError,
    StoreLocation,
    collection_names,
    collection_stats,
    connect,
    default_persist_dir,
    delete_collection,
    get_collection,
    ingest,
)
from .embeddings import DEFAULT_EMBEDDING_MODEL, Embedder

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "ChromaRetriever",
    "Chunk",
    "Embedder",
    "IngestReport",
    "StoreError",
    "StoreLocation",
    "chunk_text",
    "collection_names",
    "collection_stats",
    "connect",
    "default_persist_dir",
    "delete_collection",
    "get_collection",
    "ingest",
]
