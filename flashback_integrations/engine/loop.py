"""The decode loop with periodic retrieval.

Every step lays out the full context (``layout.build_spans``, the docs/method.md table) and asks
:class:`~.kvcache.KVContext` for its next-token logits; the cache logic lives there alone. The loop
decides when to retrieve, what the model sees, how a token is chosen, and what is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import FlashBackConfig
from ..errors import ConfigError, RetrievalError
from ..events import (
    Event,
    FinishEvent,
    FlashBackCallback,
    GenerationResult,
    Retrieval,
    RetrievalEvent,
    TokenEvent,
    TokenLogprob,
)
from ..retrieval.base import Passage
from ..retrieval.guard import GuardedRetriever
from .backend import Backend, CacheContext
from .constrained import Constraint, Grammar
from .kv import KVContext
from .layout import (
    MarkIds,
    Span,
    build_spans,
    encode_text,
    find_mark_ids,
    passage_ids,
    passage_segments,
    query_ids,
    wrap_block,
)
from .passages import PassageKVCache
from .sampling import Sampling, choose_token
from .server import ServerError
from .text import StreamingText


@dataclass
class GenerationSpec:
    """Everything one generation needs, validated by ``FlashBackModel`` before any work."""

    prompt_ids: list[int]
    config: FlashBackConfig
    marks: MarkIds | None
    max_new_tokens: int
    retrieve: Callable[[str, int], list[Passage]] | None
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    eos_ids: set[int] = field(default_factory=set)
    callbacks: list[FlashBackCallback] = field(default_factory=list)
    output_logits: bool = False
    first_query: str | None = None
    first_query_ids: list[int] | None = None
    """``first_query`` tokenized once: later queries read the question and the answer so far."""
    mode_reason: str | None = None
    passage_cache: PassageKVCache | None = None
    fingerprint: Hashable | None = None
    grammar: Grammar | None = None
    top_logprobs: int | None = None
    """None: no log-probabilities; n >= 0: each token's log-probability and the n most likely."""
    question: Retrieval | None = None
    """The question's passages already in the prompt (``question_passages``), reported with the result."""


def run(backend: Backend, tokenizer: Any, spec: GenerationSpec) -> Iterator[Event]:
    """Generate token by token in the calling thread, retrieving every ``stride`` tokens."""
    if getattr(backend, "samples_remotely", False):
        yield from _run_strides(backend, tokenizer, spec)
        return
    cfg = spec.config
    started = time.perf_counter()
    prompt = spec.prompt_ids
    generated: list[int] = []
    retrievals: list[Retrieval] = []
    blocks: list[list[int]] = []
    block_step = 0
    kv = backend.open(spec.passage_cache, spec.fingerprint)
    text = StreamingText(tokenizer, spec.stop)
    retriever = GuardedRetriever(spec.retrieve, cfg) if cfg.retrieves else None
    generator = None
    sampling = spec.sampling
    processors = sampling.processors()
    if sampling.temperature > 0:
        device = kv.device if kv.device.type != "mps" else torch.device("cpu")
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.seed() % (2**63)))
    known = spec.marks or find_mark_ids(tokenizer)  # never sampled, even when marks are off
    banned = [known.left, known.right] if known else []
    finish = "length"
    fed_total = 0
    logprobs: list[TokenLogprob] | None = [] if spec.top_logprobs is not None else None
    constraint = None
    if spec.grammar is not None:
        constraint = Constraint(spec.grammar, tokenizer, backend.vocab_size, spec.eos_ids)
    try:
        for step in range(spec.max_new_tokens):
            record: Retrieval | None = None
            if retriever is not None and step % cfg.stride == 0:
                record, blocks = _retrieve(spec, tokenizer, retriever, prompt, generated, step)
                block_step = step
            ctx = _context(cfg, prompt, generated, block_step, blocks, tokenizer.bos_token_id)
            logits, kept, fed = kv.next_logits(ctx)
            fed_total += fed + kv.stats.segment_tokens_computed
            if record is not None:
                _record_cost(record, kv)
                retrievals.append(record)
                for cb in spec.callbacks:
                    cb.on_retrieval_end(record)
                yield RetrievalEvent(record)
            raw = logits if spec.output_logits else None
            if banned:
                logits = logits.clone() if raw is not None else logits
                logits[banned] = float("-inf")
            model_logits = logits
            if constraint is not None:
                logits = constraint.mask(logits)
            history = (*prompt, *generated) if sampling.repetition_penalty != 1.0 else ()
            token = choose_token(logits, sampling, generator, history, processors)
            if constraint is not None:
                constraint.accept(token)
            scored = _logprob(model_logits, token, spec.top_logprobs) if logprobs is not None else None
            if scored is not None:
                logprobs.append(scored)
            delta, finish, last = _take(token, spec, text, generated)
            event = TokenEvent(step=step, token_id=token, text=delta, logits=raw, logprob=scored)
            for cb in spec.callbacks:
                cb.on_token(event)
            yield event
            if last:
                break
    finally:
        if retriever is not None:
            retriever.close()
        if hasattr(kv, "close"):
            kv.close()  # its cache goes to the next call (the torch backend's pool)
    yield FinishEvent(
        GenerationResult(
            text=text.text,
            token_ids=generated,
            retrievals=retrievals,
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(prompt),
            forward_tokens=fed_total,
            elapsed_s=time.perf_counter() - started,
            logprobs=logprobs,
            mode=spec.config.mode,
            backend=backend.name,
            mode_reason=spec.mode_reason,
            question=spec.question,
        )
    )


def _take(token: int, spec: GenerationSpec, text: StreamingText, generated: list[int]) -> tuple[str, str, bool]:
    """Append one chosen id: the text it makes visible, the finish reason so far, whether it is the last."""
    generated.append(token)
    is_eos = token in spec.eos_ids
    delta = "" if is_eos else text.add(token)
    finish = "eos" if is_eos else "stop" if text.stopped else "length"
    last = finish != "length" or len(generated) == spec.max_new_tokens
    if last:
        delta += text.finish()  # release what was held back for a possible stop string
    return delta, finish, last


def _run_strides(backend: Any, tokenizer: Any, spec: GenerationSpec) -> Iterator[Event]:
    """The same schedule on a backend that samples for itself (a server): one request per stride, whose
    context is the layout's at the retrieval; the tokens of the stride only extend it, as in :func:`run`."""
    cfg = spec.config
    started = time.perf_counter()
    prompt = spec.prompt_ids
    generated: list[int] = []
    retrievals: list[Retrieval] = []
    blocks: list[list[int]] = []
    text = StreamingText(tokenizer, spec.stop)
    retriever = GuardedRetriever(spec.retrieve, cfg) if cfg.retrieves else None
    known = spec.marks or find_mark_ids(tokenizer)
    banned = [known.left, known.right] if known else []
    stride = cfg.stride if retriever is not None else spec.max_new_tokens
    finish = "length"
    fed_total = 0
    try:
        while len(generated) < spec.max_new_tokens and finish == "length":
            step = len(generated)
            record: Retrieval | None = None
            if retriever is not None:
                record, blocks = _retrieve(spec, tokenizer, retriever, prompt, generated, step)
            (span,) = _context(cfg, prompt, generated, step, blocks, tokenizer.bos_token_id)
            want = min(stride, spec.max_new_tokens - step)
            got, cached, emitted = 0, None, None
            chunks = backend.complete(span.ids, want, spec.sampling, banned, ignore_eos=not spec.eos_ids)
            try:
                for chunk in chunks:
                    if cached is None and chunk.cached_tokens is not None:
                        cached = chunk.cached_tokens
                        if emitted is not None:  # vLLM reports it with the stride's last token, not its first
                            emitted.reused_tokens, emitted.prefill_tokens = cached, len(span.ids) - cached
                    if record is not None and (chunk.token_ids or chunk.finish_reason):
                        if cached is not None:  # what the server's prefix cache kept, as it reports it
                            record.reused_tokens, record.prefill_tokens = cached, len(span.ids) - cached
                        emitted = record
                        retrievals.append(record)
                        for cb in spec.callbacks:
                            cb.on_retrieval_end(record)
                        yield RetrievalEvent(record)
                        record = None
                    for token in chunk.token_ids:
                        got += 1
                        delta, finish, last = _take(token, spec, text, generated)
                        event = TokenEvent(step=len(generated) - 1, token_id=token, text=delta)
                        for cb in spec.callbacks:
                            cb.on_token(event)
                        yield event
                        if finish != "length":
                            break
                    if finish == "length" and chunk.finish_reason == "stop":
                        finish = "eos"  # the server met an end-of-generation id
                    if finish != "length":
                        break
            finally:
                chunks.close()  # a stop string ends the request on the server too
            fed_total += len(span.ids) - (cached or 0) + max(0, got - 1)  # prompt fed, then a decode per token
            if finish == "length" and got < want and len(generated) < spec.max_new_tokens:
                raise ServerError(f"the server returned {got} of the {want} tokens asked for, without a reason.")
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
            mode=spec.config.mode,
            backend=backend.name,
            mode_reason=spec.mode_reason,
            question=spec.question,
        )
    )


def _logprob(logits: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """The chosen token's log-probability under the model (marks already -inf) and the ``top`` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token_id=token, logprob=float(logp[token]), top=pairs)


def run_rows(model: Any, tokenizer: Any, specs: Sequence[GenerationSpec]) -> list[GenerationResult]:
    """Greedy generation of several sequences in lockstep, one batched forward per step.

    Each row retrieves with its own query, and the cache logic is :class:`KVContext`'s, so every
    row's tokens are those of :func:`run` on that row alone. The rows' contexts must keep equal
    lengths (equal prompt lengths and passages of equal token length, as in the runtime benchmark);
    EOS and stop strings are not applied.
    """
    cfg = specs[0].config
    steps = specs[0].max_new_tokens
    started = time.perf_counter()
    kv = KVContext(model, specs[0].passage_cache, specs[0].fingerprint)
    retrievers = [GuardedRetriever(spec.retrieve, cfg) if cfg.retrieves else None for spec in specs]
    generated: list[list[int]] = [[] for _ in specs]
    blocks: list[list[list[int]]] = [[] for _ in specs]
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
                _context(cfg, spec.prompt_ids, generated[i], block_step, blocks[i], tokenizer.bos_token_id)
                for i, spec in enumerate(specs)
            ]
            shapes = [[len(s.ids) for s in c] for c in ctxs]
            if any(shape != shapes[0] for shape in shapes):
                raise ConfigError(
                    f"Batched rows diverged in length at step {step} (context span lengths {shapes}): "
                    "generate_batch needs prompts of equal token length and passages of equal token length "
                    "(e.g. Passage.token_ids of a fixed size). Use generate() per prompt otherwise."
                )
            logits, kept, fed = kv.next_logits_rows(ctxs)
            fed_total += fed + kv.stats.segment_tokens_computed
            for i, record in enumerate(records):
                if record is not None:
                    _record_cost(record, kv)
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
            mode=specs[i].config.mode,
            backend="torch",
            mode_reason=specs[i].mode_reason,
        )
        for i, tokens in enumerate(generated)
    ]


def _retrieve(
    spec: GenerationSpec,
    tokenizer: Any,
    retriever: GuardedRetriever,
    prompt: list[int],
    generated: list[int],
    step: int,
) -> tuple[Retrieval, list[list[int]]]:
    cfg = spec.config
    if step == 0 and spec.first_query is not None:
        query = spec.first_query
    else:  # with first_query (a chat), the question and the answer so far: never the chat template's text
        source = prompt if spec.first_query is None else _question_ids(tokenizer, spec)
        query = tokenizer.decode(query_ids(source, generated, cfg.query_tokens), skip_special_tokens=True).strip()
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
    if cfg.mode == "isolated":
        blocks = passage_segments(tokenizer, passages, cfg.max_doc_tokens, spec.marks)
    else:
        block = wrap_block(passage_ids(tokenizer, passages, cfg.max_doc_tokens), spec.marks)
        blocks = [block] if block else []
    record = Retrieval(
        step=step,
        query=query,
        passages=passages,
        block_tokens=sum(len(b) for b in blocks),
        latency_s=latency,
        error=error,
    )
    return record, blocks


def _question_ids(tokenizer: Any, spec: GenerationSpec) -> list[int]:
    if spec.first_query_ids is None:
        spec.first_query_ids = encode_text(tokenizer, spec.first_query or "", add_special_tokens=False) + [
            *encode_text(tokenizer, "\n", add_special_tokens=False)
        ]
    return spec.first_query_ids


def _context(
    cfg: FlashBackConfig,
    prompt: Sequence[int],
    generated: Sequence[int],
    block_step: int,
    blocks: Sequence[Sequence[int]],
    bos_id: int | None,
) -> list[Span]:
    return build_spans(
        cfg.mode,
        prompt,
        generated,
        block_step,
        blocks,
        bos_id,
        tail_tokens=cfg.tail_tokens,
        passage_sink=cfg.passage_sink,
        block_offset=cfg.block_offset,
    )


def _record_cost(record: Retrieval, kv: CacheContext) -> None:
    stats = kv.stats
    record.reused_tokens, record.prefill_tokens = stats.kept, stats.fed
    record.segments_computed, record.segments_reused = stats.segments_computed, stats.segments_reused
    record.segment_tokens_computed = stats.segment_tokens_computed
