"""The retriever protocol the engine consumes, and a small in-memory BM25 retriever."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError, RetrievalError


@dataclass(frozen=True)
class Passage:
    """One retrieved passage; only ``text`` reaches the model, the rest is for reporting."""

    text: str
    id: str | None = None
    score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    raw: Any = field(default=None, compare=False, hash=False, repr=False)
    token_ids: tuple[int, ...] | None = field(default=None, compare=False, hash=False, repr=False)
    """Pre-tokenised text in the reader's vocabulary; used instead of tokenising ``text`` when given."""
    """The framework object it came from (a LangChain ``Document``, a LlamaIndex ``NodeWithScore``)."""


@runtime_checkable
class Retriever(Protocol):
    """Anything with ``retrieve(query, k)`` returning up to ``k`` passages, best first."""

    def retrieve(self, query: str, k: int) -> Sequence[str | Passage]: ...


RetrieverLike = Retriever | Callable[[str, int], Sequence[str | Passage]]


def as_retrieve_fn(retriever: RetrieverLike) -> Callable[[str, int], list[Passage]]:
    """Normalise a retriever object or plain callable into ``(query, k) -> list[Passage]``.

    The returned function validates what the retriever gives back, so a retriever that returns
    something other than text fails with an error naming the type instead of deep in tokenisation.
    """
    from .adapt import wrap_framework_retriever

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
        return coerce_passages(raw, source=name)[:k]

    retrieve.source = retriever  # type: ignore[attr-defined]  # who a hung call belongs to
    return retrieve


def coerce_passages(raw: Any, source: str = "retriever") -> list[Passage]:
    """Turn a retriever's answer into ``Passage`` objects, refusing anything that is not text."""
    if raw is None:
        return []
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise RetrievalError(
            f"{source} returned {type(raw).__name__}; a retriever must return a list of str or Passage."
        )
    passages: list[Passage] = []
    for i, item in enumerate(raw):
        if isinstance(item, Passage):
            if not isinstance(item.text, str):
                raise RetrievalError(f"{source} returned a Passage whose text is {type(item.text).__name__}, not str.")
            passages.append(item)
        elif isinstance(item, str):
            passages.append(Passage(text=item))
        else:
            raise RetrievalError(
                f"{source} returned an item of type {type(item).__name__} at position {i}; "
                "a retriever must return a list of str or Passage."
            )
    return passages


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
        from .files import iter_files, read_text

        texts: list[str] = []
        ids: list[str] = []
        for f in iter_files(paths):
            text, _ = read_text(f)
            if text is None:  # binary or empty: skipped, as `index add` does
                continue
            words = text.split()
            for start in range(0, len(words), chunk_words):
                texts.append(" ".join(words[start : start + chunk_words]))
                ids.append(f"{f}#{start // chunk_words}")
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
        from ..store.chroma import all_chunks, build_where

        excluded = [str(Path(s).resolve()) if Path(s).exists() else str(s) for s in exclude_source or []]
        ids, texts, metas = all_chunks(collection, build_where(where, excluded))
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
