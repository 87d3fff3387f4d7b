"""Grammar-constrained decoding through llguidance: a JSON schema, any JSON object, a Lark grammar or
a regex masks the logits at every step, so the output parses whatever the model's size. Retrieval is
untouched by it (the grammar sees generated ids only, never the passages)."""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError

GrammarKind = Literal["json_schema", "json_object", "lark", "regex"]
# One space after separators and no free whitespace: the form models read most, and no room for a
# small model to wander into endless newlines inside a JSON value.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # a core dependency; only a broken install gets here
        raise ConfigError("constrained decoding needs llguidance: pip install llguidance.") from exc
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What the output must match. Build one with :meth:`json_schema`, :meth:`json_object`,
    :meth:`lark` or :meth:`regex`; it is compiled against a tokenizer when a generation starts."""

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str | type) -> Grammar:
        """A JSON schema (dict or string) or a pydantic model class."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"the JSON schema is not JSON ({exc.msg}).") from exc
        if not isinstance(schema, dict):
            raise ConfigError(
                f"a JSON schema must be a dict, a JSON string or a pydantic model class, got {type(schema).__name__}."
            )
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (JSON mode)."""
        return cls("json_object", json.dumps({"type": "object"}))

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (``%json{...}`` embeds a JSON schema)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConfigError("a Lark grammar must be a non-empty string.")
        return cls("lark", grammar)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("a regex grammar must be a non-empty string.")
        return cls("regex", pattern)

    def __post_init__(self) -> None:
        """Checked when built, so a schema or grammar the library rejects fails before any generation."""
        problem = _llguidance().LLMatcher.validate_grammar(self.compiled())
        if problem and not problem.startswith("WARNING"):
            raise ConfigError(f"the grammar library rejects this {self.kind.replace('_', ' ')}: {problem.strip()}")

    def compiled(self) -> str:
        """llguidance's grammar text for this grammar."""
        matcher = _llguidance().LLMatcher
        if self.kind in ("json_schema", "json_object"):
            return matcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
        if self.kind == "lark":
            return matcher.grammar_from_lark(self.source)
        return matcher.grammar_from_regex(self.source)


def closed(schema: Any) -> Any:
    """``schema`` with every object that lists its properties closed to others (``additionalProperties:
    false`` where unset), as OpenAI's strict structured output does; derived schemas (pydantic, tools)
    leave it unset, and a grammar that allows extra keys lets a small model add them without end."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def schema_hint(messages: list[dict[str, Any]], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Chat messages with the schema stated after the last user turn. The grammar guarantees the shape;
    the model fills it in sensibly only when it knows what the fields mean (a 135M model told nothing
    loops inside the first string until max_tokens)."""
    hint = f"\n\nAnswer with a JSON object matching this schema:\n{json.dumps(schema)}"
    out = [dict(m) for m in messages]
    users = [i for i, m in enumerate(out) if m["role"] == "user"]
    if users:
        out[users[-1]]["content"] += hint
    else:
        out.append({"role": "user", "content": hint.strip()})
    return out


_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a Hugging Face tokenizer (about a second to build, so kept per tokenizer).

    Built from the Rust tokenizer's JSON: transformers 5's tokenizer classes (``Qwen2Tokenizer``, ...)
    are Rust-backed without subclassing ``PreTrainedTokenizerFast``, which ``llguidance.hf`` checks for."""
    llg = _llguidance()
    key = (vocab_size, eos_ids)
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in cached:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ConfigError(
                    f"constrained decoding needs a Rust-backed (fast) tokenizer; {type(tokenizer).__name__} is not one."
                )
            backend = copy.copy(backend)
            backend.no_padding()
            backend.no_truncation()
            cached[key] = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
        return cached[key]


class Constraint:
    """One generation's grammar state: masks the logits before each choice and follows each token."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        llg = _llguidance()
        eos_ids = tuple(sorted(eos_ids))
        if not eos_ids:
            raise ConfigError("constrained decoding needs an end-of-sequence token to finish the output.")
        self.grammar = grammar
        # the model's rows and the tokenizer's ids can differ either way (padded embeddings, ids added
        # on load); the mask covers both and is cut to the logits
        self._tokenizer = _ll_tokenizer(tokenizer, max(vocab_size, len(tokenizer)), eos_ids)
        compiled = grammar.compiled()
        problem = llg.LLMatcher.validate_grammar(compiled, self._tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise ConfigError(f"the grammar library rejects this {grammar.kind.replace('_', ' ')}: {problem}")
        self._matcher = llg.LLMatcher(self._tokenizer, compiled, log_level=0)
        if self._matcher.is_error():
            raise ConfigError(f"the grammar library rejects this {grammar.kind}: {self._matcher.get_error()}")
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ([vocab]) with every token the grammar forbids set to -inf (a new tensor)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[-1]].astype(bool)
        if not allowed.any():
            raise ConfigError(f"the grammar allows no next token ({self._matcher.get_error() or 'dead end'}).")
        keep = torch.from_numpy(allowed).to(logits.device)
        return logits.masked_fill(~keep, float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConfigError(f"token {token} broke the grammar: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing but the end may follow."""
        return self._matcher.is_stopped()
