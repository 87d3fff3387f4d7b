"""Where retrieval happens: the passage type and retriever protocol (``base``), the adapters for
LangChain/LlamaIndex retrievers and Chroma collections (``adapt``), the timeout and error policy
(``guard``), BM25 (``bm25``), and the one file walker (``files``) and chunker (``chunking``) that the
store, BM25 and the example builder share."""

from .adapt import as_retrieve_fn
from .base import Passage, Retriever, RetrieverLike, coerce_passages
from .bm25 import BM25Retriever

__all__ = ["BM25Retriever", "Passage", "Retriever", "RetrieverLike", "as_retrieve_fn", "coerce_passages"]
