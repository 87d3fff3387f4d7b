"""``FlashBackQueryEngine``: the question first, retrieved nodes appended after it, more on the way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.prompts.mixin import PromptDictType, PromptMixinType
from llama_index.core.schema import NodeWithScore, QueryBundle

from ..events import Event, TokenEvent, final_result
from .llms import FlashBackLLM

dispatcher = get_dispatcher(__name__)


class FlashBackQueryEngine(BaseQueryEngine):
    """RAG the FlashBack way: the model reads the question (with its top ``question_passages`` nodes in the
    user turn, as a stuff chain puts them: 1 by default), then the first retrieval (made with the question)
    is read in the llm's layout, and generation goes on retrieving every ``stride`` tokens from the same
    retriever, reusing the cache of everything before the block.

    ``source_nodes`` of the response hold the question's nodes and every node retrieved during generation,
    each with ``metadata["flashback_step"]`` (the generated-token index at which it was retrieved; 0 for
    the question's).
    """

    def __init__(
        self,
        retriever: Any,
        llm: FlashBackLLM,
        streaming: bool = False,
        system_prompt: str | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if retriever is None:
            raise ValueError(
                "FlashBackQueryEngine needs a retriever (index.as_retriever(), a ChromaRetriever or a callable "
                "(query, k) -> list[str]); with none it would run without retrieval."
            )
        if not isinstance(llm, FlashBackLLM):
            raise TypeError(f"FlashBackQueryEngine needs a FlashBackLLM, got {type(llm).__name__}.")
        if llm.flashback_config().mode == "none":
            raise ValueError(
                "FlashBackQueryEngine retrieves during generation; give it an llm with mode "
                "'isolated' or 'append' (or 'prepend' for comparison), not 'none'."
            )
        self._llm = llm.model_copy(update={"retriever": retriever})
        self._retriever = retriever
        self._streaming = streaming
        self._system_prompt = system_prompt
        super().__init__(callback_manager=callback_manager or llm.callback_manager)

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _update_prompts(self, prompts_dict: PromptDictType) -> None:
        pass

    def _get_prompt_modules(self) -> PromptMixinType:
        return {}

    def _events(self, question: str, collect: list[NodeWithScore]) -> Iterator[Event]:
        messages = [ChatMessage(role=MessageRole.USER, content=question)]
        if self._system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self._system_prompt))
        events, _ = self._llm._chat(messages, {"collect": collect})  # the chat path: question_passages included
        return events

    @dispatcher.span
    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes: list[NodeWithScore] = []
        events = self._events(query_bundle.query_str, nodes)
        if self._streaming:
            return StreamingResponse(
                response_gen=_text_deltas(events), source_nodes=nodes, metadata={"question_first": True}
            )
        result = final_result(events)
        return Response(
            response=result.text,
            source_nodes=nodes,
            metadata={"retrievals": result.retrievals, "finish_reason": result.finish_reason},
        )

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        import asyncio

        return await asyncio.to_thread(self._query, query_bundle)


def _text_deltas(events: Iterator[Event]) -> Iterator[str]:
    for event in events:
        if isinstance(event, TokenEvent) and event.text:
            yield event.text
