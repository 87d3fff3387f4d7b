"""Next-token choice: greedy by default, temperature + nucleus sampling with a seeded generator."""

from __future__ import annotations

import torch

from .errors import ConfigError


def validate_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")


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
