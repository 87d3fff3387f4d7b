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


class DiskFullError(FlashBackError, OSError):
    """A write ran out of space (or quota); what was there before is left as it was."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception's chain (libraries often wrap the OSError)."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full(where: object, what: str, fix: str = "free some space and run it again") -> DiskFullError:
    return DiskFullError(f"no space left on the disk of {where} while {what}; {fix}.")
