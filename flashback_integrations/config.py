"""FlashBack settings: one validated, serialisable object shared by the engine, CLI and adapters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import ConfigError

Mode = Literal["append", "prepend", "isolated", "none"]
MODES: tuple[str, ...] = ("append", "prepend", "isolated", "none")
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
    (In-Context RALM: block before the input, cache recomputed), ``isolated`` (each passage on its
    own at negative positions, read by the last ``tail_tokens`` tokens; both caches kept; rotary
    models only) or ``none``.
    stride: retrieve every ``stride`` generated tokens (``s``).
    query_tokens: the query is the text of the last ``query_tokens`` tokens (``l``).
    num_passages: passages per retrieval (the ``k`` passed to the retriever); each is cut to
    ``max_doc_tokens`` tokens. Named apart from sampling's ``top_k`` on purpose.
    marks: bound the block with ``<MARK_L>``/``<MARK_R>``; ``None`` uses them when the model has them.
    on_retrieval_error: ``raise`` stops generation; ``skip`` generates that stride without a block.
    retrieval_timeout: seconds a retrieval may take before it counts as failed (``None``: no limit).
    tail_tokens: ``isolated`` only: history tokens (``t``) that attend to the passages; each retrieval
    re-feeds ``stride + tail_tokens`` tokens. ``None``: the loaded adapter's setting, else 1 (the
    cheapest). Longer tails read the passage better (validation loss in README).
    passage_sink: ``isolated`` only: passages also attend to the text's first token (measured 1% better;
    off by default so the layout is exactly METHOD.md's table).
    block_offset: ``append`` only: place the block ``k`` tokens back, ``P + G[:j-k] + block + G[j-k:]``,
    the portable variant for engines that only reuse causal prefixes (0 = the paper's layout).
    """

    mode: Mode | None = None
    """None: the layout the model was loaded for (its adapter's; ``"default"``: isolated), else append."""
    stride: int = 16
    query_tokens: int = 32
    num_passages: int = 1
    max_doc_tokens: int = 128
    marks: bool | None = None
    on_retrieval_error: Literal["raise", "skip"] = "raise"
    retrieval_timeout: float | None = None
    tail_tokens: int | None = None
    """None: the setting the model's adapter was trained with, else 1."""
    passage_sink: bool = False
    block_offset: int = 0

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}.")
        require_positive_ints(self, ("stride", "query_tokens", "num_passages", "max_doc_tokens"))
        if self.marks not in (None, True, False):
            raise ConfigError(f"marks must be True, False or None (auto), got {self.marks!r}.")
        if self.on_retrieval_error not in ON_ERROR:
            raise ConfigError(f"on_retrieval_error={self.on_retrieval_error!r} is not one of {ON_ERROR}.")
        if self.retrieval_timeout is not None and not self.retrieval_timeout > 0:
            raise ConfigError(f"retrieval_timeout must be > 0 seconds or None, got {self.retrieval_timeout!r}.")
        if self.tail_tokens is not None:
            require_positive_ints(self, ("tail_tokens",))
        if self.passage_sink not in (True, False):
            raise ConfigError(f"passage_sink must be True or False, got {self.passage_sink!r}.")
        if self.passage_sink and self.mode in ("append", "prepend"):
            raise ConfigError(f"passage_sink=True applies to mode='isolated' only, not {self.mode!r}; drop it.")
        offset = self.block_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"block_offset must be an integer >= 0, got {offset!r}.")
        if offset and self.mode in ("prepend", "isolated"):
            raise ConfigError(f"block_offset applies to mode='append' only, not {self.mode!r}; set it to 0.")

    @property
    def retrieves(self) -> bool:
        return self.mode != "none"

    def replace(self, **changes: Any) -> FlashBackConfig:
        """A validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            hint = (
                " (passages per retrieval are num_passages; top_k is a sampling setting)" if "top_k" in unknown else ""
            )
            raise ConfigError(f"Unknown FlashBackConfig field(s): {sorted(unknown)}{hint}.")
        return FlashBackConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlashBackConfig:
        """From a manifest; manifests written before the rename say ``top_k`` for ``num_passages``."""
        data = rename_legacy(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def rename_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Settings saved by earlier versions (adapter manifests, example files) named the passages per
    retrieval ``top_k``."""
    if "top_k" in data and "num_passages" not in data:
        data = {("num_passages" if k == "top_k" else k): v for k, v in data.items()}
    return data
