"""What a retrieval returns (``Passage``) and what the engine accepts as a retriever."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import RetrievalError


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
