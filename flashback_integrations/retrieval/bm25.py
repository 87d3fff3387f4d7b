"""BM25 (the paper's retriever) over texts, files or a collection's chunks, with no index service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .adapt import collection_filter, read_collection
from .base import Passage
from .chunking import word_chunks
from .files import iter_files, read_text


class BM25Retriever:
    """BM25 (via ``bm25s``) over a list of texts: the paper's retriever, with no index service.

    Passages with no term in common with the query are not returned, so a query of stop words
    yields no block rather than an arbitrary one.
    """

    def __init__(
        self,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        stopwords: str = "en",
        metadatas: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        import bm25s

        if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
            raise ConfigError(f"BM25Retriever takes a list of texts, got {type(texts).__name__}.")
        texts = list(texts)
        if not texts:
            raise ConfigError("BM25Retriever needs at least one text; the corpus is empty.")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"BM25Retriever texts must be str; item {bad} is {type(texts[bad]).__name__}.")
        if not any(bm25s.tokenize(texts, stopwords=stopwords, return_ids=False, show_progress=False)):
            raise ConfigError(
                "BM25Retriever found no searchable word in its texts (empty, or stop words only); give it real text."
            )
        if ids is not None and len(ids) != len(texts):
            raise ConfigError(f"BM25Retriever got {len(texts)} texts but {len(ids)} ids.")
        self.texts = list(texts)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        self.metadatas = [dict(m) for m in metadatas] if metadatas is not None else [{} for _ in texts]
        self._stopwords = stopwords
        self._bm25 = bm25s.BM25()
        tokens = bm25s.tokenize(self.texts, stopwords=stopwords, show_progress=False)
        self._bm25.index(tokens, show_progress=False)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], chunk_words: int = 100, stopwords: str = "en") -> BM25Retriever:
        """Index text files, cut into chunks of ``chunk_words`` words (folders are walked)."""
        texts: list[str] = []
        ids: list[str] = []
        for f in iter_files(paths):
            text, _ = read_text(f)
            if text is None:  # binary or empty: skipped, as `index add` does
                continue
            for i, chunk in enumerate(word_chunks(text, chunk_words)):
                texts.append(chunk)
                ids.append(f"{f}#{i}")
        if not texts:
            raise ConfigError(f"No text found in corpus paths {[str(p) for p in paths]}.")
        return cls(texts, ids=ids, stopwords=stopwords)

    @classmethod
    def from_collection(
        cls,
        collection: Any,
        where: dict[str, Any] | None = None,
        exclude_source: Iterable[str | Path] | None = None,
    ) -> BM25Retriever:
        """BM25 over the chunks of a Chroma collection (the paper's retriever, same chunks as the vectors)."""
        excluded = [str(Path(s).resolve()) if Path(s).exists() else str(s) for s in exclude_source or []]
        ids, texts, metas = read_collection(collection, collection_filter(where, excluded))
        if not texts:
            raise ConfigError(f"Collection {collection.name!r} has no chunks that pass the filters.")
        return cls(texts, ids=ids, metadatas=metas)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        import bm25s

        if k <= 0:
            raise ConfigError(f"k must be positive, got {k}.")
        terms = bm25s.tokenize([query], stopwords=self._stopwords, return_ids=False, show_progress=False)
        if not terms or not terms[0]:
            return []
        k = min(k, len(self.texts))
        docs, scores = self._bm25.retrieve(terms, k=k, show_progress=False)
        return [
            Passage(text=self.texts[int(d)], id=self.ids[int(d)], score=float(s), metadata=self.metadatas[int(d)])
            for d, s in zip(docs[0], scores[0], strict=True)
            if s > 0
        ]
