"""Next-token choice: greedy by default, temperature + nucleus sampling with a seeded generator."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .errors import ConfigError


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}).")
    return float(value)


def validate_sampling(
    temperature: Any, top_p: Any, max_new_tokens: Any, seed: Any = None, stop: Any = None
) -> list[str]:
    """Check every sampling setting the API, the CLI and both frameworks pass; returns the stop list."""
    if _real("temperature", temperature) < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if not 0 < _real("top_p", top_p) <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer or None, got {seed!r}.")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}.")
    if any(x == "" for x in stops):
        raise ConfigError("stop strings must not be empty (an empty stop would end every generation at once).")
    return list(stops)


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Pick the next id from masked logits of shape ``[vocab]``."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        drop = cumulative - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
