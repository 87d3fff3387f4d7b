"""LlamaIndex embedding over the store's offline-resolved sentence-transformers model."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import PrivateAttr

from ..store.embeddings import DEFAULT_EMBEDDING_MODEL, Embedder


class FlashBackEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (or any sentence-transformers model), resolved like the Chroma store resolves it,
    so ``Settings.embed_model`` never has to fall back to OpenAI."""

    _embedder: Embedder = PrivateAttr()

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, **kwargs: Any) -> None:
        super().__init__(model_name=model, **kwargs)
        self._embedder = Embedder(model, batch_size=self.embed_batch_size)

    @classmethod
    def class_name(cls) -> str:
        return "FlashBackEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embedder.embed_query(query).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embedder.embed_query(text).tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embedder.embed_documents(list(texts)).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)
