"""Retrieval reporting for LlamaIndex: an instrumentation event and the legacy RETRIEVE callback."""

from __future__ import annotations

from typing import Any

from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.schema import NodeWithScore, TextNode

from ..events import FlashBackCallback, Retrieval
from ..retrieval import Passage

dispatcher = get_dispatcher(__name__)


class FlashBackRetrievalEvent(BaseEvent):
    """One periodic retrieval during a FlashBack generation, attached to the LLM call's span."""

    step: int
    query: str
    node_ids: list[str]
    block_tokens: int
    latency_s: float
    reused_tokens: int
    prefill_tokens: int
    segments_computed: int = 0
    segments_reused: int = 0
    segment_tokens_computed: int = 0
    error: str | None = None
    passages: list[dict[str, Any]] = []
    """Each passage's id, source, chunk index, score and the start of its text."""

    @classmethod
    def class_name(cls) -> str:
        return "FlashBackRetrievalEvent"


def passage_to_node(passage: Passage, step: int | None = None) -> NodeWithScore:
    """The retrieved node (a copy when it came from LlamaIndex), tagged with the step it came at."""
    raw = passage.raw
    if isinstance(raw, NodeWithScore):
        node = raw.node.model_copy(deep=True)
        score = raw.score
    else:
        node = TextNode(text=passage.text, metadata=dict(passage.metadata))
        if passage.id:
            node.id_ = passage.id
        score = passage.score
    if step is not None:
        node.metadata["flashback_step"] = step
        node.excluded_llm_metadata_keys = [*node.excluded_llm_metadata_keys, "flashback_step"]
        node.excluded_embed_metadata_keys = [*node.excluded_embed_metadata_keys, "flashback_step"]
    return NodeWithScore(node=node, score=score)


class LlamaIndexBridge(FlashBackCallback):
    """Engine callbacks -> instrumentation events (with the span captured at call start) and the
    legacy callback manager's RETRIEVE events (unless the retriever reports them itself)."""

    def __init__(
        self,
        span_id: str | None,
        callback_manager: Any | None,
        legacy: bool,
        collect: list[NodeWithScore] | None = None,
    ) -> None:
        self.span_id = span_id
        self.callback_manager = callback_manager
        self.legacy = legacy and callback_manager is not None
        self.collect = collect
        self._open: dict[int, str] = {}

    def on_retrieval_start(self, step: int, query: str) -> None:
        if self.legacy:
            self._open[step] = self.callback_manager.on_event_start(
                CBEventType.RETRIEVE, payload={EventPayload.QUERY_STR: query}
            )

    def on_retrieval_end(self, retrieval: Retrieval) -> None:
        nodes = [passage_to_node(p, retrieval.step) for p in retrieval.passages]
        if self.collect is not None:
            self.collect.extend(nodes)
        if retrieval.step in self._open:
            self.callback_manager.on_event_end(
                CBEventType.RETRIEVE, payload={EventPayload.NODES: nodes}, event_id=self._open.pop(retrieval.step)
            )
        record = retrieval.payload()
        del record["passage_ids"]  # as node ids: a node made from a passage without an id gets one
        dispatcher.event(
            FlashBackRetrievalEvent(span_id=self.span_id, node_ids=[n.node.node_id for n in nodes], **record)
        )

    def on_retrieval_error(self, step: int, query: str, error: BaseException) -> None:
        if step in self._open:
            self.callback_manager.on_event_end(
                CBEventType.RETRIEVE, payload={EventPayload.EXCEPTION: error}, event_id=self._open.pop(step)
            )
