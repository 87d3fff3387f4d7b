"""The decode loop with periodic retrieval, and the only code that touches the KV cache.

Every step asks :class:`KVContext` for the next-token logits of a full context (built by
``layout.build_context``). ``KVContext`` keeps the cache for the longest prefix it shares with
the previous context, crops the rest and feeds only the new tail. Because a token's keys and values
depend on nothing but the tokens before it, the logits equal those of a full forward over the
context. For append mode this is exactly METHOD.md's arithmetic: at a retrieval the shared prefix is
``P + G[:j-s]``, so the cache is cropped there and ``G[j-s:j] + [MARK_L] + B + [MARK_R]`` is fed in
one forward; between retrievals one token is fed per step. For prepend mode the block sits at the
front, so almost nothing is shared and the context is recomputed, as In-Context RALM does.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .config import FlashBackConfig
from .errors import RetrievalError
from .events import (
    Event,
    FinishEvent,
    FlashBackCallback,
    GenerationResult,
    Retrieval,
    RetrievalEvent,
    TokenEvent,
)
from .layout import MarkIds, build_context, find_mark_ids, passage_ids, query_ids, wrap_block
from .retrieval import Passage
from .sampling import choose_token
from .text import StreamingText


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
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


class KVContext:
    """A ``DynamicCache`` plus the exact ids it holds, so reuse can never be wrong.

    ``next_logits(ctx)`` returns the logits after the last id of ``ctx`` as a full forward over
    ``ctx`` would, recomputing only the part of ``ctx`` that differs from what is cached.
    ``next_logits_rows`` does the same for several contexts of equal length at once (one batch):
    the cache is kept up to the shortest prefix any row shares with what it holds.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache = _RoomyCache()
        self.rows: list[list[int]] = []
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._last_only = "logits_to_keep" in params
        # transformers >= 5.2x renamed `past_key_values` to `cache`; accept both
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def ids(self) -> list[int]:
        """The ids the cache holds (single-row use)."""
        return self.rows[0] if self.rows else []

    def next_logits(self, ctx: Sequence[int]) -> tuple[torch.Tensor, int, int]:
        """Logits ``[vocab]`` after ``ctx``, the number of cached ids kept, and the number fed."""
        logits, keep, fed = self.next_logits_rows([ctx])
        return logits[0], keep, fed

    def next_logits_rows(self, ctxs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int, int]:
        """Logits ``[rows, vocab]`` after each context; contexts must have equal lengths."""
        width = len(ctxs[0]) if ctxs else 0
        if not width:
            raise ValueError("cannot compute logits for an empty context")
        if any(len(c) != width for c in ctxs):
            raise ValueError(f"contexts of a batch must have equal lengths, got {sorted({len(c) for c in ctxs})}")
        held = len(self.rows[0]) if self.rows else 0
        if len(self.rows) != len(ctxs):
            keep = 0
        else:
            keep = min(width - 1, *(_common_prefix(h, c) for h, c in zip(self.rows, ctxs, strict=True)))
        if keep == 0:
            self.cache = _RoomyCache()
        elif keep < held:
            self.cache.crop(keep - held)  # transformers 5: a negative count to remove
        input_ids = torch.tensor([list(c[keep:]) for c in ctxs], dtype=torch.long, device=self.device)
        positions = torch.arange(keep, width, dtype=torch.long, device=self.device).expand(len(ctxs), -1)
        kwargs: dict[str, Any] = {self._cache_kwarg: self.cache}
        if self._last_only:
            kwargs["logits_to_keep"] = 1
        # Keep the ids in step with the cache even if the forward fails half-way.
        self.rows = []
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=True,
                **kwargs,
            )
        self.rows = [list(c) for c in ctxs]
        return out.logits[:, -1].float(), keep, width - keep


@dataclass
class GenerationSpec:
    """Everything one generation needs, validated by ``FlashBackModel`` before any work."""

    prompt_ids: list[int]
    config: FlashBackConfig
    marks: MarkIds | None
    max_new_tokens: int
    retrieve: Callable[[str, int], list[Passage]] | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_ids: set[int] = field(default_factory=set)
    callbacks: list[FlashBackCallback] = field(default_factory=list)
    output_logits: bool = False
    first_query: str | None = None


class _Retriever:
    """Runs the user's retriever with the timeout and error policy, and times it."""

    def __init__(self, spec: GenerationSpec) -> None:
        self.spec = spec
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __call__(self, query: str) -> tuple[list[Passage], float, str | None]:
        cfg = self.spec.config
        started = time.perf_counter()
        try:
            if cfg.retrieval_timeout is None:
                passages = self.spec.retrieve(query, cfg.top_k)  # type: ignore[misc]
            else:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flashback-retr")
                future = self._pool.submit(self.spec.retrieve, query, cfg.top_k)  # type: ignore[arg-type]
                try:
                    passages = future.result(timeout=cfg.retrieval_timeout)
                except concurrent.futures.TimeoutError:
                    # the stuck call keeps its thread; later retrievals get a fresh one
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
                    raise TimeoutError(
                        f"retriever took longer than retrieval_timeout={cfg.retrieval_timeout}s"
                    ) from None
        except RetrievalError:
            raise  # wrong return type: a bug in the retriever, never skipped
        except Exception as exc:  # noqa: BLE001 - the policy decides
            latency = time.perf_counter() - started
            if cfg.on_retrieval_error == "raise":
                raise RetrievalError(
                    f"Retriever failed ({type(exc).__name__}: {exc}). Set "
                    "on_retrieval_error='skip' to generate that stride without a block."
                ) from exc
            return [], latency, f"{type(exc).__name__}: {exc}"
        return passages, time.perf_counter() - started, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def run(model: Any, tokenizer: Any, spec: GenerationSpec) -> Iterator[Event]:
    """Generate token by token in the calling thread, retrieving every ``stride`` tokens."""
    cfg = spec.config
    started = time.perf_counter()
    prompt = spec.prompt_ids
    generated: list[int] = []
    retrievals: list[Retrieval] = []
    block: list[int] = []
    block_step = 0
    kv = KVContext(model)
    text = StreamingText(tokenizer, spec.stop)
    retriever = _Retriever(spec) if cfg.retrieves else None
    generator = None
    if spec.temperature > 0:
        device = kv.device if kv.device.type != "mps" else torch.device("cpu")
        generator = torch.Generator(device=device)
        generator.manual_seed(spec.seed if spec.seed is not None else int(torch.seed() % (2**63)))
    known = spec.marks or find_mark_ids(tokenizer)  # never sampled, even when marks are off
    banned = [known.left, known.right] if known else []
    finish = "length"
    fed_total = 0
    try:
        for step in range(spec.max_new_tokens):
            record: Retrieval | None = None
            if retriever is not None and step % cfg.stride == 0:
                record, block = _retrieve(spec, tokenizer, retriever, prompt, generated, step)
                block_step = step
            ctx = build_context(cfg.mode, prompt, generated, block_step, block, tokenizer.bos_token_id)
            logits, kept, fed = kv.next_logits(ctx)
            fed_total += fed
            if record is not None:
                record.reused_tokens, record.prefill_tokens = kept, fed
                retrievals.append(record)
                for cb in spec.callbacks:
                    cb.on_retrieval_end(record)
                yield RetrievalEvent(record)
            raw = logits if spec.output_logits else None
            if banned:
                logits = logits.clone() if raw is not None else logits
                logits[banned] = float("-inf")
            token = choose_token(logits, spec.temperature, spec.top_p, generator)
            generated.append(token)
            is_eos = token in spec.eos_ids
            delta = "" if is_eos else text.add(token)
            if is_eos:
                finish = "eos"
            elif text.stopped:
                finish = "stop"
            last = finish != "length" or step == spec.max_new_tokens - 1
            if last:
                delta += text.finish()  # release what was held back for a possible stop string
            event = TokenEvent(step=step, token_id=token, text=delta, logits=raw)
            for cb in spec.callbacks:
                cb.on_token(event)
            yield event
            if last:
                break
    finally:
        if retriever is not None:
            retriever.close()
    yield FinishEvent(
        GenerationResult(
            text=text.text,
            token_ids=generated,
            retrievals=retrievals,
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(prompt),
            forward_tokens=fed_total,
            elapsed_s=time.perf_counter() - started,
        )
    )


def run_rows(model: Any, tokenizer: Any, specs: Sequence[GenerationSpec]) -> list[GenerationResult]:
    """Greedy generation of several sequences in lockstep, one batched forward per step.

    Each row retrieves with its own query, and the cache logic is :class:`KVContext`'s, so every
    row's tokens are those of :func:`run` on that row alone. The rows' contexts must keep equal
    lengths (equal prompt lengths and passages of equal token length, as in the runtime benchmark);
    EOS and stop strings are not applied.
    """
    from .errors import ConfigError

    cfg = specs[0].config
    steps = specs[0].max_new_tokens
    started = time.perf_counter()
    kv = KVContext(model)
    retrievers = [_Retriever(spec) if cfg.retrieves else None for spec in specs]
    generated: list[list[int]] = [[] for _ in specs]
    blocks: list[list[int]] = [[] for _ in specs]
    block_step = 0
    retrievals: list[list[Retrieval]] = [[] for _ in specs]
    known = specs[0].marks or find_mark_ids(tokenizer)
    banned = [known.left, known.right] if known else []
    fed_total = 0
    try:
        for step in range(steps):
            records: list[Retrieval | None] = [None] * len(specs)
            if cfg.retrieves and step % cfg.stride == 0:
                for i, (spec, retriever) in enumerate(zip(specs, retrievers, strict=True)):
                    records[i], blocks[i] = _retrieve(spec, tokenizer, retriever, spec.prompt_ids, generated[i], step)  # type: ignore[arg-type]
                block_step = step
            ctxs = [
                build_context(cfg.mode, spec.prompt_ids, generated[i], block_step, blocks[i], tokenizer.bos_token_id)
                for i, spec in enumerate(specs)
            ]
            if len({len(c) for c in ctxs}) > 1:
                raise ConfigError(
                    f"Batched rows diverged in length at step {step} (context lengths {[len(c) for c in ctxs]}): "
                    "generate_batch needs prompts of equal token length and passages of equal token length "
                    "(e.g. Passage.token_ids of a fixed size). Use generate() per prompt otherwise."
                )
            logits, kept, fed = kv.next_logits_rows(ctxs)
            fed_total += fed
            for i, record in enumerate(records):
                if record is not None:
                    record.reused_tokens, record.prefill_tokens = kept, fed
                    retrievals[i].append(record)
            if banned:
                logits[:, banned] = float("-inf")
            for row, token in zip(generated, logits.argmax(-1).tolist(), strict=True):
                row.append(int(token))
    finally:
        for retriever in retrievers:
            if retriever is not None:
                retriever.close()
    elapsed = time.perf_counter() - started
    return [
        GenerationResult(
            text=tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            retrievals=retrievals[i],
            finish_reason="length",
            prompt_tokens=len(specs[i].prompt_ids),
            forward_tokens=fed_total,
            elapsed_s=elapsed,
        )
        for i, tokens in enumerate(generated)
    ]


def _retrieve(
    spec: GenerationSpec,
    tokenizer: Any,
    retriever: _Retriever,
    prompt: list[int],
    generated: list[int],
    step: int,
) -> tuple[Retrieval, list[int]]:
    cfg = spec.config
    if step == 0 and spec.first_query is not None:
        query = spec.first_query
    else:
        query = tokenizer.decode(query_ids(prompt, generated, cfg.query_tokens), skip_special_tokens=True).strip()
    for cb in spec.callbacks:
        cb.on_retrieval_start(step, query)
    if not query:
        return Retrieval(step=step, query=query, error="empty query: nothing to retrieve with"), []
    try:
        passages, latency, error = retriever(query)
    except RetrievalError as exc:
        for cb in spec.callbacks:
            cb.on_retrieval_error(step, query, exc)
        raise
    block = wrap_block(passage_ids(tokenizer, passages, cfg.max_doc_tokens), spec.marks)
    record = Retrieval(
        step=step, query=query, passages=passages, block_tokens=len(block), latency_s=latency, error=error
    )
    return record, block
