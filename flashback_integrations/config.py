"""FlashBack settings: one validated, serialisable object shared by the engine, CLI and adapters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import ConfigError

Mode = Literal["append", "prepend", "none"]
MODES: tuple[str, ...] = ("append", "prepend", "none")
ON_ERROR: tuple[str, ...] = ("raise", "skip")


def require_positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    """The settings objects' shared check: each named field is an int > 0 (``True`` is not an int here)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


@dataclass
class FlashBackConfig:
    """How retrieval is interleaved with generation (METHOD.md).

    mode: ``append`` (FlashBack: block after the input, cache of the input kept), ``prepend``
    (In-Context RALM: block before the input, cache recomputed) or ``none``.
    stride: retrieve every ``stride`` generated tokens (``s``).
    query_tokens: the query is the text of the last ``query_tokens`` tokens (``l``).
    top_k: passages per retrieval; each is cut to ``max_doc_tokens`` tokens and they are concatenated.
    marks: bound the block with ``<MARK_L>``/``<MARK_R>``; ``None`` uses them when the model has them.
    on_retrieval_error: ``raise`` stops generation; ``skip`` generates that stride without a block.
    retrieval_timeout: seconds a retrieval may take before it counts as failed (``None``: no limit).
    """

    mode: Mode = "append"
    stride: int = 16
    query_tokens: int = 32
    top_k: int = 1
    max_doc_tokens: int = 128
    marks: bool | None = None
    on_retrieval_error: Literal["raise", "skip"] = "raise"
    retrieval_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}.")
        require_positive_ints(self, ("stride", "query_tokens", "top_k", "max_doc_tokens"))
        if self.marks not in (None, True, False):
            raise ConfigError(f"marks must be True, False or None (auto), got {self.marks!r}.")
        if self.on_retrieval_error not in ON_ERROR:
            raise ConfigError(f"on_retrieval_error={self.on_retrieval_error!r} is not one of {ON_ERROR}.")
        if self.retrieval_timeout is not None and not self.retrieval_timeout > 0:
            raise ConfigError(f"retrieval_timeout must be > 0 seconds or None, got {self.retrieval_timeout!r}.")

    @property
    def retrieves(self) -> bool:
        return self.mode != "none"

    def replace(self, **changes: Any) -> FlashBackConfig:
        """A validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"Unknown FlashBackConfig field(s): {sorted(unknown)}.")
        return FlashBackConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlashBackConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
