"""``FlashBackLLM`` for LlamaIndex: a ``CustomLLM`` that retrieves every ``stride`` tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.schema import NodeWithScore

from ..events import Event, FinishEvent, GenerationResult, TokenEvent, final_result
from ..framework_settings import FlashBackSettings
from ..layout import block_budget
from .events import LlamaIndexBridge


def chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages -> chat-template dicts, adjacent same-role messages merged."""
    out: list[dict[str, str]] = []
    for message in messages:
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        text = message.content or ""
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


class FlashBackLLM(FlashBackSettings, CustomLLM):
    """A local causal LM with FlashBack retrieval during generation, for LlamaIndex.

    Without a ``retriever`` it is a plain local LLM (e.g. as the ``llm`` of a stock query engine).
    ``metadata.context_window`` leaves room for the retrieval blocks, so synthesizers do not over-pack
    the prompt.
    """

    @classmethod
    def class_name(cls) -> str:
        return "FlashBackLLM"

    @property
    def metadata(self) -> LLMMetadata:
        fb = self.flashback()
        config = self.flashback_config()
        window = fb.context_window or 2048
        if self.retriever is not None and config.retrieves:
            marks = config.marks is not False and fb.mark_ids is not None
            window -= block_budget(config.num_passages, config.max_doc_tokens, marks)
        return LLMMetadata(
            context_window=window, num_output=self.max_new_tokens, is_chat_model=True, model_name=self.model_label()
        )

    # ------------------------------------------------------------------ the one generation path
    def run(
        self,
        prompt: str | list[int],
        first_query: str | None = None,
        collect: list[NodeWithScore] | None = None,
        **kwargs: Any,
    ) -> Iterator[Event]:
        """Engine events for one call, with retrievals reported to LlamaIndex."""
        fb, _ = self.flashback_for_call(kwargs)
        stop = kwargs.pop("stop", None)
        bridge = LlamaIndexBridge(
            span_id=active_span_id.get(),  # captured now: inside a stream generator the span is gone
            callback_manager=self.callback_manager,
            legacy=not isinstance(self.retriever, BaseRetriever),
            collect=collect,
        )
        gen = self.generation_kwargs(stop, first_query=first_query, **kwargs)
        return fb.stream(prompt, self.retriever, callbacks=[bridge], **gen)

    @staticmethod
    def _raw(result: GenerationResult) -> dict[str, Any]:
        return {
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "retrievals": result.retrievals,
        }

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> tuple[list[int], str | None]:
        dicts = chat_dicts(messages)
        if self.system_prompt and not any(d["role"] == "system" for d in dicts):
            dicts.insert(0, {"role": "system", "content": self.system_prompt})
        users = [d["content"] for d in dicts if d["role"] == "user"]
        return self.flashback().chat_ids(dicts), (users[-1] if users else None)

    # ------------------------------------------------------------------ LlamaIndex API
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        result = final_result(self.run(prompt, **kwargs))
        return CompletionResponse(text=result.text, raw=self._raw(result))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        return self._completion_gen(self.run(prompt, **kwargs))

    def _completion_gen(self, events: Iterator[Event]) -> CompletionResponseGen:
        text = ""
        for event in events:
            if isinstance(event, TokenEvent) and event.text:
                text += event.text
                yield CompletionResponse(text=text, delta=event.text)
            elif isinstance(event, FinishEvent):
                yield CompletionResponse(text=text, delta="", raw=self._raw(event.result))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        ids, question = self._chat_prompt(messages)
        result = final_result(self.run(ids, first_query=question, **kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=self._raw(result))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        ids, question = self._chat_prompt(messages)
        return self._chat_gen(self.run(ids, first_query=question, **kwargs))

    def _chat_gen(self, events: Iterator[Event]) -> ChatResponseGen:
        text = ""
        for event in events:
            if isinstance(event, TokenEvent) and event.text:
                text += event.text
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=event.text)
            elif isinstance(event, FinishEvent):
                yield ChatResponse(
                    message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="", raw=self._raw(event.result)
                )
