"""The generation cache: the only code that feeds a model over a KV cache (the passage-KV cache it draws
on is ``passages``).

:class:`KVContext` is given the whole context at every step, as spans (``layout.Span``), and returns
the next-token logits a full forward over that context would give. It keeps the cache for the longest
prefix it shares with what it holds, crops the rest and feeds only what changed. A token's keys and
values depend on nothing but what it attends to, so this is exact: in append mode a retrieval keeps
``P + G[:j-s]`` and feeds ``G[j-s:j] + block``; in prepend mode almost nothing is shared; in isolated
mode the head is kept, the ``s`` tokens leaving the tail are fed, each passage segment's KV is taken
from :class:`PassageKVCache` (or computed on its own, at its own positions) and appended, and the
tail is fed with explicit positions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .activation import is_activated, lora_gate
from .layout import Span
from .passages import LayerKV, PassageKVCache, weights_fingerprint
from .pool import ContextPool, PooledCache, cache_bytes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case (a plain decode step), compared at C speed
        return n
    lo, hi = 0, n  # binary search on prefix equality: O(n log n) in C instead of a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of a buffer with spare room.

    ``DynamicLayer`` concatenates on every update, which copies the layer's whole cache once per
    decoded token (a full read and write of the cache per step; on this CPU the measured gain was
    0-7% of a decode step at batch 1 and 3% at batch 8, see ``benchmarks/cache_ab.py``;
    the copy outgrows the weights on a GPU at long contexts and large batches). Writing into spare
    room avoids that copy, and ``DynamicLayer.crop`` (a shorter view) still applies. The first update
    of an empty layer keeps its keys and values contiguous, as ``DynamicLayer`` does: attention over a
    strided view made a 1,900-token recompute (prepend's every retrieval) about 16% slower on this CPU.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held, need = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        if held == 0:  # room is made on the next update, when a copy is due anyway
            self.keys, self.values, self._room = key_states.contiguous(), value_states.contiguous(), None
            return self.keys, self.values
        room = self._room
        if (
            room is None
            or need > room[0].shape[-2]
            or room[0].shape[:-2] != key_states.shape[:-2]
            or self.keys._base is not room[0]  # replaced by another DynamicLayer method
        ):
            size = max(need + 256, room[0].shape[-2] * 3 // 2 if room is not None else 0)
            room = tuple(  # type: ignore[assignment]
                new.new_empty(*new.shape[:-2], size, new.shape[-1]) for new in (key_states, value_states)
            )
            room[0][..., :held, :] = self.keys
            room[1][..., :held, :] = self.values
            self._room = room
        room[0][..., held:need, :] = key_states
        room[1][..., held:need, :] = value_states
        self.keys, self.values = room[0][..., :need, :], room[1][..., :need, :]
        return self.keys, self.values


class _RoomyCache(DynamicCache):
    """``DynamicCache`` (so model code treats it as one) built from :class:`_RoomyLayer`."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=_RoomyLayer)


def uses_rotary_positions(model: Any) -> bool:
    """Whether positions enter through rotary embeddings (the isolated layout needs negative positions
    that a key can be read at; learned absolute position tables such as GPT-2's/OPT's have none)."""
    return any("rotary" in type(m).__name__.lower() for m in model.modules())


def takes_custom_masks(model: Any) -> bool:
    """One forward per isolated retrieval needs a custom 4D mask: sdpa and eager attention take one
    (flash-attention kernels do not; there the head rest and the tail are two forwards)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


@dataclass
class FeedStats:
    """What the last ``next_logits`` call cost: causal tokens fed, and the segments it needed."""

    kept: int = 0
    fed: int = 0
    segments_computed: int = 0
    segments_reused: int = 0
    segment_tokens_computed: int = 0


def as_spans(ctx: Sequence[int] | Sequence[Span]) -> tuple[Span, ...]:
    if ctx and isinstance(ctx[0], Span):
        return tuple(ctx)  # type: ignore[arg-type]
    return (Span(tuple(int(i) for i in ctx)),)  # type: ignore[arg-type]


def _shape(spans: Sequence[Span]) -> tuple[tuple[int, int, bool, bool], ...]:
    return tuple((len(s.ids), s.start, s.isolated, s.sink is not None) for s in spans)


def _shared(held: Sequence[Span], new: Sequence[Span]) -> int:
    """Physical tokens at the front of ``held`` whose KV ``new`` would compute identically."""
    keep = 0
    for a, b in zip(held, new, strict=False):
        if a == b:
            keep += len(a.ids)
            continue
        if not a.isolated and not b.isolated and a.start == b.start:
            keep += common_prefix(a.ids, b.ids)
        break
    return keep


def _positions(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.long)


class KVContext:
    """A ``DynamicCache`` plus the exact spans it holds, so reuse can never be wrong.

    ``next_logits(ctx)`` returns the logits after the last id of ``ctx`` (a list of ids, or of
    ``Span``s whose last one is causal) as a full forward over ``ctx`` would, recomputing only the part
    of ``ctx`` that differs from what is cached; ``stats`` says what that cost. ``next_logits_rows``
    does the same for several contexts of one shape at once (one batch): the cache is kept up to the
    shortest prefix any row shares with what it holds.
    """

    def __init__(
        self,
        model: Any,
        passages: PassageKVCache | None = None,
        fingerprint: Hashable | None = None,
        pool: ContextPool | None = None,
    ) -> None:
        import inspect

        self.model = model
        self.cache = _RoomyCache()
        self.rows: list[tuple[Span, ...]] = []
        self.device = next(model.parameters()).device
        self.passages = passages
        self.fingerprint = fingerprint if fingerprint is not None or passages is None else weights_fingerprint(model)
        self.stats = FeedStats()
        self._displaced: tuple[int, int, int] | None = None
        self.pool = pool if pool is not None and pool.max_bytes > 0 else None
        self._weights: Hashable | None = None
        self._merge = takes_custom_masks(model)
        self._gated = is_activated(model)  # LoRA from the passage on: each forward says where it is on
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._last_only = "logits_to_keep" in params
        # transformers >= 5.2x renamed `past_key_values` to `cache`; accept both
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def ids(self) -> list[int]:
        """The ids the cache holds, in cache order (single-row use)."""
        return [i for span in self.rows[0] for i in span.ids] if self.rows else []

    def next_logits(self, ctx: Sequence[int] | Sequence[Span]) -> tuple[torch.Tensor, int, int]:
        """Logits ``[vocab]`` after ``ctx``, the number of cached ids kept, and the number fed."""
        logits, keep, fed = self.next_logits_rows([ctx])
        return logits[0], keep, fed

    def next_logits_rows(self, ctxs: Sequence[Sequence[int] | Sequence[Span]]) -> tuple[torch.Tensor, int, int]:
        """Logits ``[rows, vocab]`` after each context; contexts must have one shape (equal lengths)."""
        rows = [as_spans(c) for c in ctxs]
        if not rows or not rows[0] or not rows[0][-1].ids:
            raise ValueError("cannot compute logits for an empty context")
        shape = _shape(rows[0])
        if any(_shape(r) != shape for r in rows):
            widths = sorted({sum(len(s.ids) for s in r) for r in rows})
            raise ValueError(f"contexts of a batch must have equal lengths and layouts, got lengths {widths}")
        if rows[0][-1].isolated:
            raise ValueError("a context must end in a causal span (the tokens that predict)")
        width = sum(n for n, *_ in shape)
        if not self.rows and self.pool is not None and len(rows) == 1:
            self._adopt(rows[0])
        keep = (
            0
            if len(self.rows) != len(rows)
            else min(width - 1, *(_shared(h, r) for h, r in zip(self.rows, rows, strict=True)))
        )
        keep = self._crop(keep)
        stats = FeedStats(kept=keep)
        self.rows = []  # keep the spans in step with the cache even if a forward fails half-way
        logits = None
        offset = 0
        spans = rows[0]
        with torch.no_grad():
            i = 0
            while i < len(spans):
                span = spans[i]
                end = offset + len(span.ids)
                if end <= keep:
                    offset, i = end, i + 1
                    continue
                if span.isolated:
                    self._append_segments([r[i] for r in rows], stats)
                    offset, i = end, i + 1
                    continue
                skip = max(0, keep - offset)
                ids = [list(r[i].ids[skip:]) for r in rows]
                if self._merge and i + 2 < len(spans) and all(s.isolated for s in spans[i + 1 : -1]):
                    logits = self._feed_retrieval(rows, i, skip, stats)
                    break
                after_passage = any(s.isolated for s in spans[:i])  # the tail that reads the passages
                logits = self._forward(ids, _positions(span.start + skip, len(ids[0])), self.cache, gate=after_passage)
                stats.fed += len(ids[0])
                offset, i = end, i + 1
        self.rows = rows
        self.stats = stats
        assert logits is not None  # the last span is causal and feeds at least one token
        return logits, keep, stats.fed

    def _adopt(self, row: tuple[Span, ...]) -> None:
        """Start from the pooled cache (an earlier call's) that shares the most with ``row``."""
        self._weights = weights_fingerprint(self.model)
        found = self.pool.take(self._weights, row, _shared) if self.pool is not None else None
        if found is not None:
            self.cache, self.rows, self._displaced = found.cache, [found.rows], found.displaced

    def close(self) -> None:
        """The generation is over: leave its cache to the next call (single-row contexts only)."""
        if self.pool is not None and len(self.rows) == 1 and self.cache.get_seq_length() > 0:
            weights = self._weights if self._weights is not None else weights_fingerprint(self.model)
            entry = PooledCache(weights, self.rows[0], self.cache, self._displaced, cache_bytes(self.cache))
            self.rows, self.cache = [], _RoomyCache()
            self.pool.put(entry)

    def _feed_retrieval(self, rows: list[tuple[Span, ...]], i: int, skip: int, stats: FeedStats) -> torch.Tensor:
        """Head rest (span ``i`` from ``skip``), segments, tail in ONE forward with a 4D mask.

        Cached segments are appended first; the others are fed in the forward itself, each row
        attending to its own segment only (their KV then goes to the passage cache); the head rows
        see the kept head and themselves, the tail everything. The head rest thus sits after the
        segments in the cache until the next crop moves it back (``_displaced``).
        """
        spans = rows[0]
        seg_at = range(i + 1, len(spans) - 1)
        sinks = any(spans[j].sink is not None for j in seg_at)
        cached, missing = [], []
        for j in seg_at:
            found = [self._lookup(r[j]) for r in rows]
            if all(f is not None for f in found) or sinks:  # a sink: computed on its own (it sees H[0])
                cached.append(j)
            else:
                missing.append(j)
        for j in cached:
            self._append_segments([r[j] for r in rows], stats)
        past = self.cache.get_seq_length()
        keep = past - sum(len(spans[j].ids) for j in cached)
        ids: list[list[int]] = [[] for _ in rows]
        positions: list[int] = []
        own: list[tuple[int, int]] = []  # the new tokens' segment ranges, relative to the forward
        for j in missing:
            own.append((len(positions), len(positions) + len(spans[j].ids)))
            for row, r in zip(ids, rows, strict=True):
                row.extend(r[j].ids)
            positions.extend(range(spans[j].start, spans[j].start + len(spans[j].ids)))
        head = len(spans[i].ids) - skip
        first_head = len(positions)
        for row, r in zip(ids, rows, strict=True):
            row.extend(r[i].ids[skip:])
            row.extend(r[-1].ids)
        positions.extend(range(spans[i].start + skip, spans[i].start + len(spans[i].ids)))
        positions.extend(range(spans[-1].start, spans[-1].start + len(spans[-1].ids)))
        width = len(positions)
        q = torch.arange(width, device=self.device)[:, None]
        kv = torch.arange(past + width, device=self.device)[None, :]
        allowed = kv <= q + past  # causal: the tail sees everything
        allowed[first_head : first_head + head, keep:past] = False  # head rows: not the cached segments
        allowed[first_head : first_head + head, past : past + first_head] = False  # nor the new ones
        for lo, hi in own:  # a new segment sees itself only
            allowed[lo:hi, : past + lo] = False
        gate = [True] * first_head + [False] * head + [True] * len(spans[-1].ids)  # segments, head rest, tail
        logits = self._forward(ids, torch.tensor(positions, device=self.device), self.cache, allowed, gate)
        for (lo, hi), j in zip(own, missing, strict=True):
            for row, r in enumerate(rows):
                kv_seg: LayerKV = tuple(
                    (
                        layer.keys[row : row + 1, :, past + lo : past + hi, :].clone(),
                        layer.values[row : row + 1, :, past + lo : past + hi, :].clone(),
                    )
                    for layer in self.cache.layers
                )
                if self.passages is not None:
                    self.passages.put(self._key(r[j]), kv_seg)
            stats.segments_computed += len(rows)
            stats.segment_tokens_computed += hi - lo
        start = sum(len(s.ids) for s in spans[:i]) + skip  # context index of the head rest
        self._displaced = (start, head, past + first_head)
        stats.fed += head + len(spans[-1].ids)
        return logits

    def _key(self, span: Span) -> Hashable:
        return (self.fingerprint, span.ids, span.start, span.sink)

    def _lookup(self, span: Span) -> LayerKV | None:
        return None if self.passages is None else self.passages.peek(self._key(span))

    def _crop(self, keep: int) -> int:
        """Keep the first ``keep`` tokens of the context (in context order) in the cache; returns how
        many are kept (fewer only when passages behind a moved head rest would have to stay)."""
        held = self.cache.get_seq_length() if self.rows else 0
        moved = self._displaced
        self._displaced = None
        if keep == 0 or not self.rows:
            self.cache = _RoomyCache()
            return 0
        if moved is not None:
            start, count, at = moved  # context tokens start..start+count are in the cache at at..at+count
            if start + count < keep < at + count:  # some passages kept: recompute them after the head
                keep = start + count
            if keep >= at + count:
                self._displaced = moved  # the whole shuffled region is kept as it is
            elif keep > start:  # bring the kept part of the head rest back in front of the passages
                n = keep - start
                for layer in self.cache.layers:
                    for t in (layer.keys, layer.values):
                        t[..., start : start + n, :] = t[..., at : at + n, :].clone()
        if keep < held:
            self.cache.crop(keep - held)  # transformers 5: a negative count to remove
        return keep

    def _forward(
        self,
        ids: list[list[int]],
        positions: torch.Tensor,
        cache: Cache,
        allowed: torch.Tensor | None = None,
        gate: bool | list[bool] = False,
    ) -> torch.Tensor:
        """Feed ``ids`` at ``positions``; ``allowed`` (``[new, cached + new]``, True = may attend) replaces
        the causal mask. ``gate`` says which fed tokens an activated adapter applies to (all or per token)."""
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self._gated:
            flags = gate if isinstance(gate, list) else [gate] * input_ids.shape[1]
            # every token off: no mask at all, so the LoRA layers are skipped rather than zeroed
            on = torch.tensor(flags, device=self.device)[None].expand(input_ids.shape[0], -1) if any(flags) else None
            with lora_gate(on):
                return self._forward_ungated(input_ids, positions, cache, allowed)
        return self._forward_ungated(input_ids, positions, cache, allowed)

    def _forward_ungated(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: Cache, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        rows = input_ids.shape[0]
        kwargs: dict[str, Any] = {self._cache_kwarg: cache}
        if allowed is not None:
            dtype = self.model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            kwargs["attention_mask"] = mask[None, None].expand(rows, 1, -1, -1)
        if self._last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, position_ids=positions.to(self.device).expand(rows, -1), use_cache=True, **kwargs
        )
        return out.logits[:, -1].float()

    def _append_segments(self, spans: list[Span], stats: FeedStats) -> None:
        """Append one isolated segment per row (from the passage cache, or computed on its own)."""
        per_row = [self._segment_kv(span, stats) for span in spans]
        empty = self.cache.get_seq_length() == 0  # the layer would hold the shared tensor itself
        for layer, pairs in enumerate(zip(*per_row, strict=True)):
            keys = torch.cat([k for k, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
            values = torch.cat([v for _, v in pairs]) if len(pairs) > 1 else pairs[0][1]
            if empty and len(pairs) == 1:
                keys, values = keys.clone(), values.clone()
            self.cache.update(keys, values, layer)

    def _segment_kv(self, span: Span, stats: FeedStats) -> LayerKV:
        key = self._key(span)
        if self.passages is not None:
            found = self.passages.get(key)
            if found is not None:
                stats.segments_reused += 1
                return found
        cache = _RoomyCache()
        skip = 0
        if span.sink is not None:  # the text's first token, alone at position 0, as the head holds it
            self._forward([[span.sink]], _positions(0, 1), cache)
            skip = 1
        self._forward([list(span.ids)], _positions(span.start, len(span.ids)), cache, gate=True)
        kv: LayerKV = tuple(
            (layer.keys[..., skip:, :].clone(), layer.values[..., skip:, :].clone()) for layer in cache.layers
        )
        stats.segments_computed += 1
        stats.segment_tokens_computed += len(span.ids)
        if self.passages is not None:
            self.passages.put(key, kv)
        return kv
