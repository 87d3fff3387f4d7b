"""What a retrieval returns (``Passage``) and what the engine accepts as a retriever."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
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
    """The framework object it came from (a LangChain ``Document``, a LlamaIndex ``NodeWithScore``)."""
    token_ids: tuple[int, ...] | None = field(default=None, compare=False, hash=False, repr=False)
    """Pre-tokenised text in the reader's vocabulary; used instead of tokenising ``text`` when given."""

    def __post_init__(self) -> None:
        ids = self.token_ids
        if ids is None:
            return
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise RetrievalError(f"Passage.token_ids must be a sequence of token ids, got {type(ids).__name__}.")
        ids = tuple(ids)
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0), None)
        if bad is not None:
            raise RetrievalError(
                f"Passage.token_ids must hold non-negative integers, got {bad!r} ({type(bad).__name__}); "
                "a float is never rounded to an id."
            )
        object.__setattr__(self, "token_ids", tuple(int(t) for t in ids))  # frozen: normalised once


@runtime_checkable
class Retriever(Protocol):
    """Anything with ``retrieve(query, k)`` returning up to ``k`` passages, best first."""

    def retrieve(self, query: str, k: int) -> Sequence[str | Passage]: ...


RetrieverLike = Retriever | Callable[[str, int], Sequence[str | Passage]]


def coerce_passages(raw: Any, source: str = "retriever", limit: int | None = None) -> list[Passage]:
    """Turn a retriever's answer into ``Passage`` objects, refusing anything that is not text; only the
    first ``limit`` items are read (a retriever may yield far more than asked for)."""
    if raw is None:
        return []
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise RetrievalError(
            f"{source} returned {type(raw).__name__}; a retriever must return a list of str or Passage."
        )
    passages: list[Passage] = []
    for i, item in enumerate(raw if limit is None else islice(raw, limit)):
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
