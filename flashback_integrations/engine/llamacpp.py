"""The llama.cpp backend: a GGUF model in this process (``llama-cpp-python``), its own KV cache reused with
the torch backend's arithmetic: keep the longest prefix shared with what it holds (never the whole
context: the last id is always fed, as vLLM caps a prefix hit), drop the rest, feed what changed.

One ``Llama`` holds one sequence. Calls share it under a lock and each call compares its context with
whatever the model holds now, so interleaved calls stay exact (they only reuse less), and a multi-turn chat
that re-sends its history feeds only the new turn. The isolated layout needs tokens at explicit positions,
which this backend does not place; ``FlashBackModel`` refuses ``mode="isolated"`` here before any work.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .kv import FeedStats, as_spans, common_prefix
from .layout import Span
from .passages import PassageKVCache


class LlamaCppBackend:
    name = "llamacpp"
    places_positions = False
    activated = False

    def __init__(self, llama: Any, context_window: int | None = None) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llama = llama
        self.vocab_size = int(llama.n_vocab())
        self.context_window = context_window or int(llama.n_ctx())
        self.lock = threading.Lock()

    def open(self, passages: PassageKVCache | None, fingerprint: Hashable | None) -> LlamaCppContext:
        return LlamaCppContext(self)


class LlamaCppContext:
    device = torch.device("cpu")

    def __init__(self, backend: LlamaCppBackend) -> None:
        self.backend = backend
        self.stats = FeedStats()

    def next_logits(self, ctx: Sequence[int] | Sequence[Span]) -> tuple[torch.Tensor, int, int]:
        spans = as_spans(ctx)
        if len(spans) != 1 or spans[0].isolated or spans[0].start != 0:
            raise ConfigError("the llama.cpp backend feeds one causal sequence; mode='isolated' needs torch.")
        ids = list(spans[0].ids)
        if not ids:
            raise ValueError("cannot compute logits for an empty context")
        llama = self.backend.llama
        with self.backend.lock:
            held = llama.input_ids[: llama.n_tokens].tolist()
            keep = min(common_prefix(held, ids), len(ids) - 1)
            llama.n_tokens = keep  # eval() drops llama.cpp's KV cache from here on
            llama.eval(ids[keep:])
            # the last fed id's logits (llama.cpp computes no others unless logits_all, which costs n_ctx x vocab)
            row = self.backend.llama_cpp.llama_get_logits_ith(llama.ctx, -1)
            logits = torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.backend.vocab_size,)).copy())
        self.stats = FeedStats(kept=keep, fed=len(ids) - keep)
        return logits, keep, len(ids) - keep
