"""LangChain ``Embeddings`` over the store's offline-resolved sentence-transformers model."""

from __future__ import annotations

from langchain_core.embeddings import Embeddings

from ..store.embeddings import DEFAULT_EMBEDDING_MODEL, Embedder


class FlashBackEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 (or any sentence-transformers model) resolved like the Chroma store resolves it:
    from the registry wheel when it is installed, else the hub."""

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32) -> None:
        self.embedder = Embedder(model, batch_size=batch_size)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed_documents(list(texts)).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed_query(text).tolist()
