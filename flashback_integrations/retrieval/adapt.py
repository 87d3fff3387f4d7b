"""Let the engine take a LangChain or LlamaIndex retriever as it is.

Detection looks only at modules the user has already imported, so neither framework is imported
(or required) by the core package.
"""

from __future__ import annotations

import sys
from typing import Any

from .base import Passage


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
