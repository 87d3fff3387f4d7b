"""The llama.cpp backend: a GGUF model in this process through llama.cpp's C API (``llama-cpp-python``'s
low-level bindings), every layout included, with the torch backend's cache arithmetic.

llama.cpp builds the attention mask from sequence ids and positions: a token attends to the cells that
carry its sequence id at positions not after its own. One unified KV cache holds:

- seq 0, the text: prompt and generated ids at positions ``room + i``, computed with the adapter off. A
  none/append/prepend context is this sequence alone (keep the longest shared prefix, feed the rest).
- seqs 2 .. 2 + ``SEGMENTS_AT_ONCE``, one per passage segment while it is computed (or restored from the
  passage cache): a segment attends to itself only. Its cells are then tagged with seq 1, its own id dropped.
- seq 1, the isolated view: the segments at ``room - B .. room - 1``, the head ``H[:-t]`` (seq 0's cells,
  tagged with seq 1: nothing is copied) and the tail ``H[-t:] + G[j:]``, decoded in seq 1 with an activated
  adapter on.

Positions start at ``room`` (the most passage tokens one retrieval may place) because llama.cpp has no
negative positions; rotary embeddings are relative, so this is the layout's definition up to rounding.
Calls share the context under a lock; each compares its context with what is held, so interleaved calls
stay exact (they only reuse less), and a failed call leaves an empty cache, never a half-written one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ModelResolutionError
from .kv import FeedStats, as_spans, common_prefix
from .layout import Span
from .passages import PassageKVCache

TEXT, VIEW, FIRST_SEGMENT = 0, 1, 2
SEGMENTS_AT_ONCE = 8
"""Passage segments computed in one batch (each in its own sequence)."""
TAIL_ROOM = 1024
"""Cells kept for the isolated tail (``tail_tokens`` + the tokens generated since the retrieval)."""
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
"""ggml types of the KV cache: f32 gives the torch backend's logits to 1e-4 on the tests' models."""


def _lib() -> Any:
    import llama_cpp
    import llama_cpp._logger  # noqa: F401 - installs llama-cpp-python's log callback, which reads this logger's level

    # llama.cpp's own log off (its callback prints what is at or above this level; ggml's level numbers have
    # shifted between versions, so no level of theirs passes): our errors say what went wrong
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
    return llama_cpp


def _free(lib: Any, handles: dict[str, Any]) -> None:
    """Release the C objects once (at close, garbage collection or interpreter exit, whichever is first)."""
    if handles.get("batch") is not None:
        lib.llama_batch_free(handles.pop("batch"))
    if handles.get("ctx"):
        lib.llama_free(handles.pop("ctx"))
    if handles.get("adapter"):
        free_adapter = getattr(lib, "llama_adapter_lora_free", None)
        adapter = handles.pop("adapter")
        if free_adapter is not None:
            free_adapter(adapter)
    if handles.get("model"):
        lib.llama_model_free(handles.pop("model"))


@dataclass
class _View:
    """What seq 1 holds: the segments (ids, start), the head tagged from seq 0, the tail decoded there."""

    segments: tuple[tuple[tuple[int, ...], int], ...]
    head: tuple[int, ...]
    tail: list[int] = field(default_factory=list)


class LlamaCppBackend:
    """A GGUF on llama.cpp: every mode, a LoRA GGUF on from the passage on (``activated``), passage KV cached."""

    name = "llamacpp"

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        lora_path: str | Path | None = None,
        activated: bool = False,
        kv_type: str = "f16",
        passage_room: int = 1024,
        n_batch: int = 512,
    ) -> None:
        if kv_type not in KV_TYPES:
            raise ConfigError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}.")
        for name, value in (("passage_room", passage_room), ("n_batch", n_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        lib = self.lib = _lib()
        lib.llama_backend_init()
        self.model_path, self.kv_type, self.room, self.n_batch = Path(model_path), kv_type, passage_room, n_batch
        self._handles: dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, _free, lib, self._handles)
        model = lib.llama_model_load_from_file(str(model_path).encode(), lib.llama_model_default_params())
        if not model:
            raise ModelResolutionError(f"llama.cpp cannot load {model_path}; is it a GGUF model file?")
        self._handles["model"] = model
        self._vocab = lib.llama_model_get_vocab(model)
        self.vocab_size = int(lib.llama_vocab_n_tokens(self._vocab))
        self.context_window = int(n_ctx or lib.llama_model_n_ctx_train(model))
        self.problem = _position_problem(lib, model)
        params = lib.llama_context_default_params()
        params.n_ctx = passage_room + self.context_window + TAIL_ROOM
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = FIRST_SEGMENT + SEGMENTS_AT_ONCE
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        params.kv_unified = True  # one cell pool: tagging a cell with another sequence copies nothing
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.no_perf = True
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            raise ModelResolutionError(f"llama.cpp cannot create a context for {model_path} (out of memory?).")
        self._handles["ctx"] = ctx
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._handles["batch"] = self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self.lora_path = Path(lora_path) if lora_path is not None else None
        self._adapter = None
        if lora_path is not None:
            adapter = lib.llama_adapter_lora_init(model, str(lora_path).encode())
            if not adapter:
                raise ModelResolutionError(f"llama.cpp cannot load the LoRA GGUF {lora_path} for {model_path}.")
            self._handles["adapter"] = self._adapter = adapter
        self.activated = bool(activated and self._adapter is not None)
        """The adapter is on from the passage on only (the isolated default); else always on (or none)."""
        self._lora_on: bool | None = None
        self.lock = threading.Lock()
        self.text: list[int] = []
        self.view: _View | None = None
        self._fingerprint = self._digest()
        if self._adapter is not None and not self.activated:
            self._set_lora(True)

    # ------------------------------------------------------------------ protocol
    @property
    def places_positions(self) -> bool:
        return self.problem is None

    def fingerprint(self) -> Hashable:
        return self._fingerprint

    def open(self, passages: PassageKVCache | None, fingerprint: Hashable | None) -> LlamaCppContext:
        return LlamaCppContext(self, passages, fingerprint)

    def close(self) -> None:
        """Free llama.cpp's model and context now (they are freed at garbage collection otherwise)."""
        with self.lock:
            self._finalizer()

    def piece(self, token: int) -> str:
        """A token's text as llama.cpp's vocabulary has it (special tokens included)."""
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def forget(self) -> None:
        """Empty every sequence (the next call starts cold)."""
        self.lib.llama_memory_clear(self._mem, True)
        self.text, self.view = [], None

    # ------------------------------------------------------------------ the sequences
    def _digest(self) -> Hashable:
        def stamp(path: Path | None) -> tuple:
            if path is None:
                return ()
            st = path.stat()
            return (str(path.resolve()), st.st_size, st.st_mtime_ns)

        raw = repr(("llamacpp", stamp(self.model_path), stamp(self.lora_path), self.activated, self.kv_type, self.room))
        return ("llamacpp", hashlib.sha256(raw.encode()).hexdigest(), id(self))

    def _set_lora(self, on: bool) -> None:
        if self._adapter is None or self._lora_on == on:
            return
        lib = self.lib
        if hasattr(lib, "llama_set_adapters_lora"):
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (ctypes.c_float * 1)(1.0)
            lib.llama_set_adapters_lora(self._ctx, adapters, 1 if on else 0, scales)
        elif on:
            lib.llama_set_adapter_lora(self._ctx, self._adapter, 1.0)
        else:
            lib.llama_rm_adapter_lora(self._ctx, self._adapter)
        self._lora_on = on

    def _decode(self, tokens: Sequence[tuple[int, int, int]], logits: bool) -> torch.Tensor | None:
        """Decode (token, position, sequence) triples in batches of ``n_batch``; the last one's logits."""
        lib, batch = self.lib, self._batch
        out = None
        for begin in range(0, len(tokens), self.n_batch):
            chunk = tokens[begin : begin + self.n_batch]
            last = begin + len(chunk) == len(tokens)
            for i, (token, pos, seq) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits and last and i == len(chunk) - 1
            batch.n_tokens = len(chunk)
            code = lib.llama_decode(self._ctx, batch)
            if code != 0:
                raise RuntimeError(
                    f"llama.cpp could not decode {len(chunk)} tokens (code {code}: "
                    + ("no free KV cells; lower stride + tail_tokens, or load with a larger n_ctx" if code == 1 else "")
                    + ")."
                )
        if logits:
            row = lib.llama_get_logits_ith(self._ctx, -1)
            out = torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.vocab_size,)).copy())
        return out

    def _seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        if not self.lib.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise RuntimeError(f"llama.cpp refused to remove positions {p0}..{p1} of sequence {seq}.")

    def _drop_view(self) -> None:
        if self.view is not None:
            self._seq_rm(VIEW)
            self.view = None

    def _text_to(self, ids: Sequence[int], need_logits: bool) -> tuple[torch.Tensor | None, int]:
        """Make seq 0 hold ``ids`` (with the adapter off unless it is always on); at least the last id is fed
        when logits are wanted. Returns the logits and how many ids were kept."""
        ids = list(ids)  # compared with a list: a tuple never equals one
        keep = common_prefix(self.text, ids)
        if need_logits:
            keep = min(keep, len(ids) - 1)
        if keep == len(ids):
            return None, keep
        if self.view is not None and keep < len(self.view.head):
            self._drop_view()  # its head cells would outlive seq 0's: never more cells than the budget
        self._seq_rm(TEXT, self.room + keep)
        self.text = self.text[:keep]
        self._set_lora(not self.activated)
        logits = self._decode([(t, self.room + keep + i, TEXT) for i, t in enumerate(ids[keep:])], need_logits)
        self.text = list(ids)
        return logits, keep

    def _segments_into_view(
        self, segments: Sequence[Span], cache: PassageKVCache | None, fingerprint: Hashable, stats: FeedStats
    ) -> None:
        """Compute (or restore) each segment in its own sequence, then tag its cells with the view's."""
        lib = self.lib
        for begin in range(0, len(segments), SEGMENTS_AT_ONCE):
            group = segments[begin : begin + SEGMENTS_AT_ONCE]
            tokens: list[tuple[int, int, int]] = []
            to_save: list[tuple[int, Hashable]] = []
            for k, seg in enumerate(group):
                seq = FIRST_SEGMENT + k
                key = ("llamacpp-segment", fingerprint, seg.ids, self.room + seg.start)
                data = cache.get(key) if cache is not None else None
                if data is not None:
                    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                    if lib.llama_state_seq_set_data(self._ctx, buf, len(data), seq) == 0:
                        raise RuntimeError("llama.cpp could not restore a cached passage segment.")
                    stats.segments_reused += 1
                    continue
                tokens += [(t, self.room + seg.start + i, seq) for i, t in enumerate(seg.ids)]
                to_save.append((seq, key))
                stats.segments_computed += 1
                stats.segment_tokens_computed += len(seg.ids)
            if tokens:
                self._set_lora(self._adapter is not None)
                self._decode(tokens, logits=False)
            for seq, key in to_save:
                if cache is not None:
                    size = lib.llama_state_seq_get_size(self._ctx, seq)
                    buf = (ctypes.c_uint8 * size)()
                    written = lib.llama_state_seq_get_data(self._ctx, buf, size, seq)
                    cache.put(key, bytes(buf[:written]))
            for k in range(len(group)):
                lib.llama_memory_seq_cp(self._mem, FIRST_SEGMENT + k, VIEW, -1, -1)
                self._seq_rm(FIRST_SEGMENT + k)

    def isolated(
        self, spans: Sequence[Span], cache: PassageKVCache | None, fingerprint: Hashable
    ) -> tuple[torch.Tensor, FeedStats]:
        head = spans[0].ids if not spans[0].isolated else ()
        segments = [s for s in spans if s.isolated]
        tail = spans[-1]
        if tail.isolated or tail.start != len(head):
            raise ValueError("an isolated context is head, segments, tail")
        if any(s.sink is not None for s in segments):
            raise ConfigError("passage_sink=True is not on the llama.cpp backend (its cells attend by sequence).")
        block = sum(len(s.ids) for s in segments)
        if block > self.room:
            raise ConfigError(
                f"this retrieval places {block} passage tokens; the llama.cpp backend was loaded with passage_room="
                f"{self.room}. Load it with a larger passage_room, or lower num_passages x max_doc_tokens."
            )
        stats = FeedStats()
        _, kept_head = self._text_to(head, need_logits=False)
        stats.fed += len(head) - kept_head
        wanted = tuple((s.ids, s.start) for s in segments)
        view = self.view
        if view is None or view.segments != wanted or view.head != tuple(head):
            self._drop_view()
            self._segments_into_view(segments, cache, fingerprint, stats)
            if head:
                self.lib.llama_memory_seq_cp(self._mem, TEXT, VIEW, self.room, self.room + len(head))
            view = self.view = _View(wanted, tuple(head))
        ids = list(tail.ids)
        keep = min(common_prefix(view.tail, ids), len(ids) - 1)
        self._seq_rm(VIEW, self.room + len(head) + keep)
        view.tail = view.tail[:keep]
        self._set_lora(self._adapter is not None)
        start = self.room + len(head) + keep
        logits = self._decode([(t, start + i, VIEW) for i, t in enumerate(ids[keep:])], logits=True)
        view.tail = ids
        stats.fed += len(ids) - keep
        width = len(head) + block + len(ids)
        stats.kept = width - stats.fed - stats.segment_tokens_computed
        assert logits is not None
        return logits, stats


def _position_problem(lib: Any, model: Any) -> str | None:
    """Why the isolated layout cannot run on this model here, or None."""
    rope = lib.llama_model_rope_type(model)
    if rope == getattr(lib, "LLAMA_ROPE_TYPE_NONE", -1):
        return "no rotary positions"
    if rope in {getattr(lib, name, None) for name in ("LLAMA_ROPE_TYPE_MROPE", "LLAMA_ROPE_TYPE_VISION")} - {None}:
        return "multi-dimensional rotary positions"
    if lib.llama_model_is_recurrent(model):
        return "a recurrent model"
    if hasattr(lib, "llama_model_n_swa") and lib.llama_model_n_swa(model) > 0:
        return "sliding-window attention"
    return None


class LlamaCppContext:
    """One generation's view of the shared llama.cpp context."""

    device = torch.device("cpu")

    def __init__(self, backend: LlamaCppBackend, passages: PassageKVCache | None, fingerprint: Hashable | None):
        self.backend, self.passages = backend, passages
        self.fingerprint = fingerprint if fingerprint is not None else backend.fingerprint()
        self.stats = FeedStats()

    def next_logits(self, ctx: Sequence[int] | Sequence[Span]) -> tuple[torch.Tensor, int, int]:
        spans = as_spans(ctx)
        if not spans or not spans[-1].ids:
            raise ValueError("cannot compute logits for an empty context")
        backend = self.backend
        with backend.lock:
            try:
                if len(spans) == 1 and not spans[0].isolated:
                    if spans[0].start != 0:
                        raise ValueError("a causal context starts at position 0")
                    logits, keep = backend._text_to(spans[0].ids, need_logits=True)
                    stats = FeedStats(kept=keep, fed=len(spans[0].ids) - keep)
                else:
                    logits, stats = backend.isolated(spans, self.passages, self.fingerprint)
            except BaseException:
                backend.forget()  # what the sequences hold is unknown now: the next call starts cold
                raise
        assert logits is not None
        self.stats = stats
        return logits, stats.kept, stats.fed
