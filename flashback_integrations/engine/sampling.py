"""Next-token choice: greedy by default; temperature, top-k, top-p, min-p and a repetition penalty
through transformers' own logits processors, with a seeded generator."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import setting
from ..errors import ConfigError


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}).")
    return float(value)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (the other warpers then do nothing;
    the repetition penalty still applies). ``top_k`` here is sampling's top-k, never passages."""

    temperature: float = setting(0.0, "0 = greedy.")
    top_p: float = setting(1.0, "Nucleus sampling mass.")
    top_k: int | None = setting(None, "Sampling: keep the k most likely tokens (never the number of passages).")
    min_p: float | None = setting(None, "Sampling: drop tokens below min_p x the top probability.")
    repetition_penalty: float = setting(1.0, "Penalise tokens already in the text (1 = off).")
    seed: int | None = setting(None, "Sampling seed.")

    def __post_init__(self) -> None:
        if _real("temperature", self.temperature) < 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"top_k (sampling) must be a positive integer or None, got {k!r}.")
        if self.min_p is not None and not 0 <= _real("min_p", self.min_p) <= 1:
            raise ConfigError(f"min_p must be in [0, 1] or None, got {self.min_p}.")
        if not _real("repetition_penalty", self.repetition_penalty) > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty}.")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise ConfigError(f"seed must be an integer from 0 to 2**64 - 1 (torch's range) or None, got {seed!r}.")

    def processors(self) -> Any:
        """transformers' ``LogitsProcessorList`` in generate()'s order: penalties, then warpers."""
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            if self.temperature != 1.0:
                # Shifted logits over a temperature that float32 can hold: a tiny one gives 0 and -inf (greedy,
                # ties kept), never nan. Below 1e-30 no float32 logit gap survives exp(), so clamping changes nothing.
                out.append(_ShiftToMax())
                out.append(TemperatureLogitsWarper(max(self.temperature, 1e-30)))
            if self.top_k is not None:
                out.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(self.top_p))
            if self.min_p:
                out.append(MinPLogitsWarper(self.min_p))
        return out


class _ShiftToMax:
    """Logits minus their maximum: the distribution is unchanged, and dividing by any temperature > 0
    stays finite at the top (a temperature of 1e-300 becomes greedy instead of NaN)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - scores.max(dim=-1, keepdim=True).values


def validate_sampling(
    temperature: Any,
    top_p: Any,
    max_new_tokens: Any,
    seed: Any = None,
    stop: Any = None,
    top_k: Any = None,
    min_p: Any = None,
    repetition_penalty: Any = 1.0,
) -> list[str]:
    """Check every sampling setting the API, the CLI and both frameworks pass; returns the stop list."""
    Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) for x in stops):
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}.")
    if any(x == "" for x in stops):
        raise ConfigError("stop strings must not be empty (an empty stop would end every generation at once).")
    return list(stops)


MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default limit


def validate_logprobs(logprobs: Any, top_logprobs: Any) -> int | None:
    """OpenAI's ``logprobs``/``top_logprobs`` -> None (off) or how many alternatives to report."""
    if not isinstance(logprobs, bool):
        raise ConfigError(f"logprobs must be True or False, got {logprobs!r}.")
    top = top_logprobs if top_logprobs is not None else 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs!r}.")
    if top and not logprobs:
        raise ConfigError("top_logprobs needs logprobs=True.")
    return top if logprobs else None


def choose_token(
    logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None,
    history: Sequence[int] = (),
    processors: Any = None,
) -> int:
    """Pick the next id from masked logits of shape ``[vocab]``; ``history`` (prompt + generated ids)
    is what the repetition penalty looks at."""
    if processors is None:
        processors = sampling.processors()
    if len(processors):
        ids = torch.tensor([list(history) or [0]], dtype=torch.long, device=logits.device)
        logits = processors(ids, logits.float()[None])[0]
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
