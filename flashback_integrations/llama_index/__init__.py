"""LlamaIndex integration: a FlashBack LLM, a question-first query engine, and retrieval events.

Needs the ``llama-index`` extra: ``pip install "flashback-integrations[llama-index]"``.
"""

from .embeddings import FlashBackEmbedding
from .events import FlashBackRetrievalEvent
from .llms import FlashBackLLM
from .query_engine import FlashBackQueryEngine

__all__ = ["FlashBackEmbedding", "FlashBackLLM", "FlashBackQueryEngine", "FlashBackRetrievalEvent"]
