"""One call made ready for the engine: the settings resolved against the model's own, every argument checked,
the prompt encoded (with the question's passages when asked), before any model work."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

from .chat import text_with_passages
from .config import FlashBackConfig
from .engine.backend import check_backend
from .engine.constrained import Constraint, Grammar
from .engine.layout import MARK_L, MARK_R, MarkIds, block_budget
from .engine.loop import GenerationSpec
from .engine.sampling import Sampling, validate_logprobs, validate_sampling
from .errors import ConfigError, ContextWindowError, MarksUnavailableError
from .events import FlashBackCallback, check_call_arguments
from .loading.shipped import safe_mode, untrained_append_warning
from .retrieval import RetrieverLike, as_retrieve_fn

logger = logging.getLogger("flashback_integrations")


def default_mode(fb: Any) -> tuple[str, str]:
    """The layout a call gets when it names none, and why: the adapter's (or the export's), else
    :func:`safe_mode` (untrained append reads passages poorly: it runs only when asked for)."""
    if fb.config.mode is not None:
        source = "its adapter's layout" if fb.adapter_manifest is not None else "the model's saved layout"
        return fb.config.mode, source
    return safe_mode(fb.backend.places_positions)


def resolve_config(fb: Any, config: FlashBackConfig | None = None, **overrides: Any) -> FlashBackConfig:
    """The settings of one call; ``mode=None`` means the model's own layout (:func:`default_mode`), logged
    once per model and mode; ``tail_tokens=None`` the model's, else 1."""
    config = config or fb.config
    if overrides:
        config = config.replace(**overrides)
    if config.mode is None:
        mode, why = default_mode(fb)
        if fb.logged.get("mode") != mode:
            fb.logged["mode"] = mode
            logger.info("%s: mode=%s (%s)", fb.name, mode, why)
        config = config.replace(mode=mode)
    if config.tail_tokens is None:
        config = config.replace(tail_tokens=fb.config.tail_tokens or 1)
    return config


def _marks_for(fb: Any, config: FlashBackConfig) -> MarkIds | None:
    marks = fb.mark_ids
    if config.marks is True and marks is None:
        raise MarksUnavailableError(
            f"marks=True but {fb.name!r} has no {MARK_L}/{MARK_R} tokens. Load a FlashBack adapter "
            "(FlashBackModel.from_pretrained(base, adapter=DIR)) or a model saved with the marks, "
            "or set marks=False."
        )
    return marks if config.marks is not False else None


def _check_grammar(fb: Any, grammar: Any, ignore_eos: bool) -> None:
    if not isinstance(grammar, Grammar):
        raise ConfigError(
            f"grammar must be a Grammar (Grammar.json_schema(...), .json_object(), .lark(...), .regex(...)), "
            f"got {type(grammar).__name__}."
        )
    if ignore_eos:
        raise ConfigError("a grammar ends the output with EOS; it cannot be combined with ignore_eos=True.")
    Constraint(grammar, fb.tokenizer, fb.backend.vocab_size, fb.eos_ids)


def prepare_call(
    fb: Any,
    prompt: str | Sequence[int],
    retriever: RetrieverLike | None = None,
    config: FlashBackConfig | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
    callbacks: Sequence[FlashBackCallback] | None = None,
    output_logits: bool = False,
    first_query: str | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    grammar: Grammar | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> GenerationSpec:
    """The keyword arguments of ``FlashBackModel.generate``/``stream`` (declared here once), checked; a bad
    call fails here, before any model work."""
    named = (config or fb.config).mode
    config = resolve_config(fb, config)
    reason = None if named is not None else default_mode(fb)[1]
    untrained = config.mode == "append" and fb.adapter_manifest is None and fb.mark_ids is None
    if untrained and not fb.logged.get("append_warned"):
        fb.logged["append_warned"] = True
        warnings.warn(untrained_append_warning(fb.name), UserWarning, stacklevel=4)
    check_call_arguments(ignore_eos, output_logits, callbacks, first_query)
    stop = validate_sampling(temperature, top_p, max_new_tokens, seed, stop, top_k, min_p, repetition_penalty)
    top = validate_logprobs(logprobs, top_logprobs)
    if grammar is not None:
        _check_grammar(fb, grammar, ignore_eos)
    if config.retrieves and retriever is None:
        raise ConfigError(
            f"mode={config.mode!r} needs a retriever (an object with retrieve(query, k) or a "
            "callable (query, k) -> list[str]); pass one, or use mode='none'."
        )
    check_backend(fb.backend, config, fb.name, grammar is not None, output_logits, top is not None)
    marks = _marks_for(fb, config)
    prompt, question = text_with_passages(fb.tokenizer, prompt, retriever, config, first_query)
    ids = fb.encode(prompt)
    window = fb.context_window
    block = block_budget(config.num_passages, config.max_doc_tokens, marks is not None) if config.retrieves else 0
    needed = len(ids) + max_new_tokens - 1 + block
    if window is not None and needed > window:
        raise ContextWindowError(
            f"Prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) + retrieval block "
            f"(up to {block} tokens: num_passages={config.num_passages} x max_doc_tokens={config.max_doc_tokens}"
            f"{' + 2 marks' if marks else ''}) needs a context of {needed} tokens, but {fb.name!r} "
            f"has {window}. Shorten the prompt, lower max_new_tokens, num_passages or max_doc_tokens."
        )
    isolated = config.mode == "isolated"
    return GenerationSpec(
        prompt_ids=ids,
        config=config,
        marks=marks,
        max_new_tokens=max_new_tokens,
        retrieve=as_retrieve_fn(retriever) if (config.retrieves and retriever is not None) else None,
        sampling=Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed),
        stop=list(stop or []),
        eos_ids=set() if ignore_eos else fb.eos_ids,
        callbacks=list(callbacks or []),
        output_logits=output_logits,
        first_query=first_query,
        passage_cache=fb.passage_cache if isolated else None,
        fingerprint=fb.backend.fingerprint() if isolated else None,
        grammar=grammar,
        top_logprobs=top,
        mode_reason=reason,
        question=question,
    )
