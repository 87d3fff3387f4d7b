"""What a generation reports: token and retrieval events, the final result, and the callback API."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .retrieval.base import Passage

if TYPE_CHECKING:
    import torch


@dataclass
class Retrieval:
    """One periodic retrieval: made before generated token ``step`` (0, s, 2s, ...)."""

    step: int
    query: str
    passages: list[Passage] = field(default_factory=list)
    block_tokens: int = 0
    """Tokens of the block the model sees, marks included (0 when nothing was retrieved)."""
    latency_s: float = 0.0
    """Wall-clock seconds spent in the retriever."""
    reused_tokens: int = 0
    """Cached context tokens kept after this retrieval (the input's cache in append mode)."""
    prefill_tokens: int = 0
    """Tokens fed over the cache after this retrieval (``s + |B|`` in append, ``s + t`` in isolated)."""
    segments_computed: int = 0
    """Isolated mode: passage segments whose keys and values had to be computed."""
    segments_reused: int = 0
    """Isolated mode: passage segments taken from the passage-KV cache (no forward at all)."""
    segment_tokens_computed: int = 0
    """Isolated mode: tokens of the computed segments (each in a forward of its own)."""
    error: str | None = None
    """Why the block is missing when ``on_retrieval_error='skip'`` let generation go on."""

    def payload(self) -> dict[str, Any]:
        """The record as plain data (passages as their ids): what LangChain's custom event, LlamaIndex's
        ``FlashBackRetrievalEvent`` and the generation metadata carry."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "passages"}
        return {
            **record,
            "passage_ids": [p.id for p in self.passages],
            "passages": [passage_record(p) for p in self.passages],
        }


SOURCE_KEYS = ("source_name", "source", "file_name", "file_path", "url")
SNIPPET_CHARS = 160


def passage_record(passage: Passage) -> dict[str, Any]:
    """Where a passage came from, for people: its source (the first of the usual metadata keys of Chroma,
    LangChain and LlamaIndex loaders), its chunk index, its score and the start of its text."""
    meta = passage.metadata or {}
    source = next((meta[k] for k in SOURCE_KEYS if meta.get(k)), None)
    chunk = meta.get("chunk_index", meta.get("part"))
    return {
        "id": passage.id,
        "source": source,
        "chunk_index": chunk,
        "score": passage.score,
        "snippet": passage.text[:SNIPPET_CHARS],
    }


@dataclass
class TokenEvent:
    """A generated token and the text it made visible (held back while it may start a stop string)."""

    step: int
    token_id: int
    text: str
    logits: torch.Tensor | None = None
    """Raw next-token logits (before masking and sampling) when ``output_logits=True``."""
    logprob: TokenLogprob | None = None
    """The token's log-probability and the most likely alternatives, when ``logprobs`` was asked for."""


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probabilities under the model's own next-token distribution (marking tokens excluded), before
    sampling settings and grammar constraints, as vLLM's and OpenAI's ``logprobs`` report them."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """The ``top_logprobs`` most likely ids and their log-probabilities, most likely first."""


@dataclass
class RetrievalEvent:
    retrieval: Retrieval


@dataclass
class FinishEvent:
    result: GenerationResult


Event = TokenEvent | RetrievalEvent | FinishEvent
FinishReason = Literal["length", "eos", "stop"]


@dataclass
class GenerationResult:
    text: str
    """Decoded generated text (no prompt), cut at the first stop string."""
    token_ids: list[int]
    """Generated ids only (the EOS id included when generation ended on it)."""
    retrievals: list[Retrieval]
    finish_reason: FinishReason
    prompt_tokens: int
    forward_tokens: int
    """Tokens that went through the model: the compute the cache did not save."""
    elapsed_s: float
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token when ``logprobs`` was asked for."""
    mode: str | None = None
    """The layout this call ran (``config.mode`` as resolved)."""
    mode_reason: str | None = None
    """Why that layout, when the call did not name one (the adapter's; or, without one, the safe default)."""
    backend: str | None = None
    """What ran the model: torch, llamacpp or openai (``backend="auto"`` resolved)."""
    question: Retrieval | None = None
    """The question's passages put into the prompt once (``question_passages``); None when off."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class FlashBackCallback:
    """Subclass and override what you need; the framework adapters bridge these to their callbacks.

    ``on_retrieval_end`` also fires for a skipped retrieval (``retrieval.error`` set); with
    ``on_retrieval_error='raise'`` ``on_retrieval_error`` fires and generation stops.
    """

    def on_retrieval_start(self, step: int, query: str) -> None:  # noqa: B027 - optional hook
        pass

    def on_retrieval_end(self, retrieval: Retrieval) -> None:  # noqa: B027 - optional hook
        pass

    def on_retrieval_error(self, step: int, query: str, error: BaseException) -> None:  # noqa: B027
        pass

    def on_token(self, event: TokenEvent) -> None:  # noqa: B027 - optional hook
        pass


def final_result(events: Iterable[Event]) -> GenerationResult:
    """Drain a generation's events and return its result (the last ``FinishEvent``)."""
    for event in events:
        if isinstance(event, FinishEvent):
            return event.result
    raise RuntimeError("generation ended without a result")  # pragma: no cover


def logprobs_payload(tokenizer: Any, entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object (``{"content": [{"token", "bytes", "logprob", "top_logprobs"}]}``),
    which LangChain's ``response_metadata["logprobs"]`` and FlareChain read."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode("utf-8")), "logprob": logprob}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    }


_HOOKS = ("on_retrieval_start", "on_retrieval_end", "on_retrieval_error", "on_token")


def check_call_arguments(ignore_eos: Any, output_logits: Any, callbacks: Any, first_query: Any) -> None:
    """Call arguments of the wrong type fail here, named, before any model or retriever work."""
    for name, value in (("ignore_eos", ignore_eos), ("output_logits", output_logits)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    if callbacks is not None:
        if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, (list, tuple)):
            raise ConfigError(f"callbacks must be a list of FlashBackCallback objects, got {type(callbacks).__name__}.")
        for i, cb in enumerate(callbacks):
            if not all(callable(getattr(cb, hook, None)) for hook in _HOOKS):
                raise ConfigError(
                    f"callbacks[{i}] ({type(cb).__name__}) is not a FlashBackCallback: subclass "
                    "flashback_integrations.FlashBackCallback (it needs " + ", ".join(_HOOKS) + ")."
                )
    if first_query is not None and not isinstance(first_query, str):
        raise ConfigError(f"first_query must be a string or None, got {type(first_query).__name__}.")
