"""The passage-KV cache: each isolated passage's keys and values, computed once at its final positions
and reused across retrievals and calls on the same weights (LRU, bounded in bytes, thread-safe). The
key holds a fingerprint of the weights, so another model, adapter, dtype or device never hits it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

from ..errors import ConfigError

LayerKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One segment's keys and values, per layer, each ``[1, kv_heads, tokens, head_dim]``."""

DEFAULT_PASSAGE_CACHE_BYTES = 256 * 2**20
"""Half of the 512 MiB a model holds in caches by default; the context pool is the other half."""


SegmentKV = LayerKV | bytes
"""A segment's cached state: per-layer tensors (torch) or llama.cpp's serialised sequence state."""


def _kv_bytes(kv: SegmentKV) -> int:
    if isinstance(kv, (bytes, bytearray)):
        return len(kv)
    return sum(t.numel() * t.element_size() for pair in kv for t in pair)


class PassageKVCache:
    """Passage segments' keys and values, computed once and reused across retrievals and calls.

    Bounded in bytes (least recently used first out) and thread-safe. A key holds the weights'
    fingerprint (:func:`weights_fingerprint`: model, adapter, dtype, device) and the segment itself
    (ids with marks, positions, sink), so another model, adapter, dtype or mark setting never hits.
    """

    def __init__(self, max_bytes: int = DEFAULT_PASSAGE_CACHE_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(f"passage_cache_bytes must be a positive integer (bytes), got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[SegmentKV, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> SegmentKV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def peek(self, key: Hashable) -> SegmentKV | None:
        """Whether ``key`` is held (no hit/miss counted, no reordering): the caller then calls ``get``."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: Hashable, kv: SegmentKV) -> None:
        size = _kv_bytes(kv)
        if size > self.max_bytes:
            return  # larger than the whole budget: computed each time, never stored
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (kv, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def weights_fingerprint(model: Any) -> Hashable:
    """What a cached segment's KV depends on besides its ids: which tensors the model computes with
    (object, storage, in-place version), their dtype/device, and PEFT's adapter switches."""
    params = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
    adapters = tuple(
        (tuple(m.active_adapters), bool(m.disable_adapters), tuple(m.merged_adapters))
        for m in model.modules()
        if hasattr(m, "merged_adapters") and hasattr(m, "disable_adapters")
    )
    return (id(model), hash(params), adapters)
