"""Reuse across calls on the torch backend: finished generations' caches, kept for the next call.

A multi-turn chat re-sends its whole history every turn. When a generation ends, its cache (the spans it
holds and their keys and values) goes into this pool; the next call takes the entry sharing the longest
exact prefix with its context and feeds only the rest, so a fifth turn feeds its new message and not the
four before. Entries are taken out while in use (two concurrent calls never share a cache), keyed by the
weights' fingerprint (another adapter, dtype or in-place edit never hits), and bounded in bytes (LRU).
llama.cpp and servers do this natively; this is the same for the reference backend.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .layout import Span

DEFAULT_CONTEXT_POOL_BYTES = 256 * 2**20
"""Half of the 512 MiB a model holds in caches by default; the passage-KV cache is the other half."""


@dataclass
class PooledCache:
    """A finished generation's cache: what ``KVContext`` needs to continue from it."""

    fingerprint: Hashable
    rows: tuple[Span, ...]
    cache: Any
    displaced: tuple[int, int, int] | None
    size: int


def cache_bytes(cache: Any) -> int:
    """Bytes the cache holds, spare room included (what keeping it costs)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        room = getattr(layer, "_room", None)
        tensors = room if room is not None else (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


class ContextPool:
    """Finished caches by weights fingerprint, least recently used out first once over ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CONTEXT_POOL_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"context_cache_bytes must be an integer >= 0 (bytes; 0 = off), got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self._entries: list[PooledCache] = []  # oldest first
        self._lock = threading.Lock()
        self.hits = 0

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, fingerprint: Hashable, row: Sequence[Span], shared: Any) -> PooledCache | None:
        """Remove and return the entry sharing the most leading tokens with ``row`` (``shared(held, row)``
        counts them), or None when none shares any."""
        with self._lock:
            best, best_keep = None, 0
            for entry in self._entries:
                if entry.fingerprint == fingerprint:
                    keep = shared(entry.rows, row)
                    if keep > best_keep:
                        best, best_keep = entry, keep
            if best is None:
                return None
            self._entries.remove(best)
            self.hits += 1
            return best

    def put(self, entry: PooledCache) -> None:
        if entry.size > self.max_bytes:
            return
        with self._lock:
            self._entries.append(entry)
            while sum(e.size for e in self._entries) > self.max_bytes:
                self._entries.pop(0)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
