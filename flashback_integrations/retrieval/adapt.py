"""The one place that knows foreign retrieval objects: LangChain and LlamaIndex retrievers are taken
as they are, and a Chroma collection's chunks are read page by page (duck-typed, no chromadb import).

Framework detection looks only at modules the user has already imported, so neither framework is
imported (or required) by the core package.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigError
from .base import Passage, RetrieverLike, coerce_passages


class LangChainRetrieverAdapter:
    """``BaseRetriever.invoke(query)`` -> ``Passage`` list (cut to ``k``).

    LangChain retrievers choose their own result count (e.g. ``search_kwargs={"k": 4}``); set it to
    at least ``num_passages``. ``config`` is passed to ``invoke`` so callers can attach callbacks.
    """

    def __init__(self, retriever: Any, config: dict[str, Any] | None = None) -> None:
        self.retriever = retriever
        self.config = config

    def retrieve(self, query: str, k: int) -> list[Passage]:
        docs = self.retriever.invoke(query, config=self.config)
        return [
            Passage(text=d.page_content, id=getattr(d, "id", None), metadata=dict(d.metadata or {}), raw=d)
            for d in docs[:k]
        ]


class LlamaIndexRetrieverAdapter:
    """``BaseRetriever.retrieve(query)`` (``NodeWithScore`` list) -> ``Passage`` list (cut to ``k``)."""

    def __init__(self, retriever: Any) -> None:
        self.retriever = retriever

    def retrieve(self, query: str, k: int) -> list[Passage]:
        nodes = self.retriever.retrieve(query)
        return [
            Passage(
                text=n.node.get_content(),
                id=n.node.node_id,
                score=None if n.score is None else float(n.score),
                metadata=dict(n.node.metadata or {}),
                raw=n,
            )
            for n in nodes[:k]
        ]


def wrap_framework_retriever(obj: Any) -> Any | None:
    """An adapter when ``obj`` is a LangChain or LlamaIndex retriever, else ``None``."""
    lc = sys.modules.get("langchain_core.retrievers")
    if lc is not None and isinstance(obj, lc.BaseRetriever):
        return LangChainRetrieverAdapter(obj)
    li = sys.modules.get("llama_index.core.base.base_retriever")
    if li is not None and isinstance(obj, li.BaseRetriever):
        return LlamaIndexRetrieverAdapter(obj)
    return None


def as_retrieve_fn(retriever: RetrieverLike) -> Callable[[str, int], list[Passage]]:
    """Normalise a retriever object or plain callable into ``(query, k) -> list[Passage]``.

    The returned function validates what the retriever gives back, so a retriever that returns
    something other than text fails with an error naming the type instead of deep in tokenisation.
    """
    retriever = wrap_framework_retriever(retriever) or retriever
    if hasattr(retriever, "retrieve") and callable(retriever.retrieve):
        fn = retriever.retrieve
        name = type(retriever).__name__
    elif callable(retriever):
        fn = retriever
        name = getattr(retriever, "__name__", type(retriever).__name__)
    else:
        raise ConfigError(
            f"retriever of type {type(retriever).__name__} is neither an object with "
            "retrieve(query, k) nor a callable (query, k) -> list[str]."
        )

    def retrieve(query: str, k: int) -> list[Passage]:
        raw = fn(query, k)
        return coerce_passages(raw, source=name, limit=k)

    retrieve.source = retriever  # type: ignore[attr-defined]  # who a hung call belongs to
    return retrieve


def collection_filter(where: dict[str, Any] | None, exclude_source: Iterable[str] | None) -> dict[str, Any] | None:
    """A Chroma ``where`` combining a user filter with the excluded sources."""
    clauses: list[dict[str, Any]] = []
    if where:
        clauses.append(where)
    excluded = sorted(exclude_source or [])
    if excluded:
        clauses.append({"source": {"$nin": excluded}})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def read_collection(
    collection: Any, where: dict[str, Any] | None = None, page: int = 5000
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Every (id, text, metadata) of a Chroma-API collection that passes ``where``."""
    ids: list[str] = []
    texts: list[str] = []
    metas: list[dict[str, Any]] = []
    offset = 0
    while True:
        got = collection.get(include=["documents", "metadatas"], limit=page, offset=offset, where=where)
        if not got["ids"]:
            break
        ids += got["ids"]
        texts += [d or "" for d in got["documents"]]
        metas += [dict(m or {}) for m in got["metadatas"]]
        offset += len(got["ids"])
    return ids, texts, metas
