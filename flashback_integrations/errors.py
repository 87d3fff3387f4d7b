"""Errors with messages that name the problem and the fix."""

from __future__ import annotations


class FlashBackError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FlashBackError, ValueError):
    """A setting is out of range or inconsistent with the model."""


class ContextWindowError(FlashBackError, ValueError):
    """Prompt + generation + retrieval block would not fit the model's context window."""


class MarksUnavailableError(FlashBackError, ValueError):
    """`marks=True` but neither the tokenizer nor an adapter provides `<MARK_L>`/`<MARK_R>`."""


class AdapterMismatchError(FlashBackError, ValueError):
    """An adapter was trained for another base model."""


class RetrievalError(FlashBackError, RuntimeError):
    """The retriever raised, timed out, or returned something that is not text."""


class ModelResolutionError(FlashBackError, RuntimeError):
    """A model name could not be resolved to weights on this machine."""
