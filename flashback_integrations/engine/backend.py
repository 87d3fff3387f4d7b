"""What runs the model under the FlashBack loop.

The loop (layout, retrieval schedule, sampling, stop strings, events) is one piece of code; a backend only
keeps a cache of what it has seen and returns the next-token logits for a context. ``torch`` is the exact
reference (every mode, the trainer's model); ``llamacpp`` (``engine/llamacpp.py``) runs a GGUF on
llama.cpp's own KV cache with the same crop-and-re-feed arithmetic; ``openai`` (``engine/server.py``) sends
each stride to a completions server whose prefix cache does the reuse, and samples there.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import torch

from ..config import FlashBackConfig
from ..errors import ConfigError
from .activation import is_activated
from .kv import FeedStats, KVContext, uses_rotary_positions
from .layout import Span
from .passages import PassageKVCache, weights_fingerprint
from .pool import DEFAULT_CONTEXT_POOL_BYTES, ContextPool

BACKENDS = ("torch", "llamacpp", "openai")


class CacheContext(Protocol):
    """One generation's view of a backend: logits for a whole context, feeding only what changed."""

    device: torch.device
    stats: FeedStats

    def next_logits(self, ctx: Sequence[int] | Sequence[Span]) -> tuple[torch.Tensor, int, int]:
        """Logits ``[vocab]`` after ``ctx``, the number of cached ids kept and the number fed."""
        ...


class Backend(Protocol):
    name: str
    vocab_size: int
    """Rows of the output distribution (tokenizer ids beyond it do not exist for the model)."""
    context_window: int | None
    places_positions: bool
    """Whether tokens can be fed at explicit positions (the isolated layout's passages sit before the text)."""
    activated: bool
    """Whether an adapter is on only from the passage on (an activated adapter serves isolated/none only)."""

    def open(self, passages: PassageKVCache | None, fingerprint: Hashable | None) -> CacheContext: ...

    def fingerprint(self) -> Hashable:
        """What cached passage KV depends on besides its ids (weights, adapter state, cache type)."""
        ...


def check_backend(
    backend: Backend, config: FlashBackConfig, name: str, grammar: bool, output_logits: bool, logprobs: bool
) -> None:
    """Refuse, before any work, what this backend cannot do for this call."""
    problem = getattr(backend, "problem", None)
    if config.mode == "isolated" and problem is not None:
        raise ConfigError(
            f"mode='isolated' places passages before the text at their own positions; {name!r} on the "
            f"{backend.name} backend has {problem}, where that layout is not defined. Use mode='append', "
            "'prepend' or 'none'."
        )
    if config.mode == "isolated" and not backend.places_positions:
        raise ConfigError(
            f"mode='isolated' places passages at negative positions, read through rotary position "
            f"embeddings; {name!r} on the {backend.name} backend cannot (learned absolute positions, "
            "or an engine without explicit positions). Use mode='append', 'prepend' or 'none', or the torch "
            "backend with a rotary model."
        )
    if config.mode in ("append", "prepend") and backend.activated:
        raise ConfigError(
            f"this adapter is activated from the passage on (trained for mode='isolated'); mode="
            f"{config.mode!r} would read its passage with the base model. Use mode='isolated' (or 'none'), "
            "or load an adapter trained for this mode (for the default model: "
            f"FlashBackModel.from_pretrained('default', config=FlashBackConfig(mode={config.mode!r})))."
        )
    asked = {"grammar": grammar, "output_logits": output_logits, "logprobs": logprobs}
    if getattr(backend, "samples_remotely", False) and any(asked.values()):
        raise ConfigError(
            f"{', '.join(k for k, v in asked.items() if v)}: not on the {backend.name} backend, where the server "
            "samples each stride; use the torch or llamacpp backend for them."
        )


def context_window_of(config: Any) -> int | None:
    """A Hugging Face config's context length, whatever the architecture calls it."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class TorchBackend:
    """The reference: this process's PyTorch model, exact for every mode."""

    name = "torch"

    def __init__(self, model: Any, context_cache_bytes: int = DEFAULT_CONTEXT_POOL_BYTES) -> None:
        self.model = model
        self.pool = ContextPool(context_cache_bytes)
        """Finished generations' caches, for the next call that shares their prefix (a chat's next turn)."""

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def context_window(self) -> int | None:
        return context_window_of(self.model.config)

    @property
    def places_positions(self) -> bool:
        if not hasattr(self, "_rotary"):
            self._rotary = uses_rotary_positions(self.model)
        return self._rotary

    @property
    def activated(self) -> bool:
        return is_activated(self.model)

    def open(self, passages: PassageKVCache | None, fingerprint: Hashable | None) -> KVContext:
        return KVContext(self.model, passages, fingerprint, self.pool)

    def fingerprint(self) -> Hashable:
        return weights_fingerprint(self.model)
