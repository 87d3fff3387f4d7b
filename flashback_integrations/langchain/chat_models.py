"""``ChatFlashBack``: a LangChain chat model on ``BaseChatModel`` with FlashBack retrieval."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.utils.utils import LC_ID_PREFIX

from ..errors import ConfigError
from ..events import FinishEvent, GenerationResult, TokenEvent, final_result
from ._common import EventBridge, FlashBackSettings, RunRetriever, retrieval_payload

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ConfigError(f"ChatFlashBack reads text only; got a {kind!r} content block.")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> chat-template dicts, adjacent same-role messages merged."""
    out: list[dict[str, str]] = []
    for message in messages:
        role = _ROLES.get(message.type, message.type)
        text = _text(message)
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


def _usage(result: GenerationResult) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


class ChatFlashBack(FlashBackSettings, BaseChatModel):
    """A chat model that retrieves every ``stride`` tokens while it answers.

    The first retrieval's query is the last user message; later ones are the last ``query_tokens``
    tokens, as METHOD.md specifies. Calls are independent (each has its own KV cache), so ``batch``
    and threads run in parallel with the same outputs as sequential calls.
    """

    @property
    def _llm_type(self) -> str:
        return "flashback-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, **self.flashback_config().to_dict()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="flashback",
            ls_model_name=kwargs.get("model", self.model_label()),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_new_tokens),
        )
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = stops
        return params

    def _run(self, messages: list[BaseMessage], stop, run_manager, **kwargs: Any):
        fb, name = self.flashback_for_call(kwargs)
        chat = to_chat_messages(messages)
        users = [m["content"] for m in chat if m["role"] == "user"]
        prompt_ids = fb.chat_ids(chat)
        retriever = RunRetriever(self.retriever, run_manager) if self.retriever is not None else None
        events = fb.stream(
            prompt_ids,
            retriever,
            callbacks=[EventBridge(run_manager)],
            **self.generation_kwargs(stop, first_query=users[-1] if users else None, **kwargs),
        )
        return events, name

    def _metadata(self, result: GenerationResult, name: str) -> dict[str, Any]:
        return {
            "model_name": name,
            "model_provider": "flashback",
            "finish_reason": result.finish_reason,
            "retrievals": [retrieval_payload(r) for r in result.retrievals],
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        events, name = self._run(messages, stop, run_manager, **kwargs)
        result = final_result(events)
        message = AIMessage(
            content=result.text, usage_metadata=_usage(result), response_metadata=self._metadata(result, name)
        )
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self.model})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        events, name = self._run(messages, stop, run_manager, **kwargs)
        for event in events:
            if isinstance(event, TokenEvent) and event.text:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk
            elif isinstance(event, FinishEvent):
                last = AIMessageChunk(
                    content="",
                    usage_metadata=_usage(event.result),
                    response_metadata=self._metadata(event.result, name),
                    chunk_position="last",
                )
                yield ChatGenerationChunk(message=last)

    # BaseChatModel.stream/astream do not hand their run manager to _stream/_astream (by design since
    # langchain-core 0.1.x), so retrievals made while streaming could not become child runs of the
    # model run. With a retriever these two methods open the run themselves and pass it down.
    def _start_run(self, input: LanguageModelInput, config: RunnableConfig | None, stop, kwargs, manager_cls):
        config = ensure_config(config)
        messages = self._convert_input(input).to_messages()
        params = self._get_invocation_params(stop=stop, **kwargs)
        metadata = {**(config.get("metadata") or {}), **self._get_ls_params(stop=stop, **kwargs)}
        manager = manager_cls.configure(
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            metadata,
            self.metadata,
        )
        return manager, messages, params, config

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        if self.retriever is None:
            yield from super().stream(input, config, stop=stop, **kwargs)
            return
        manager, messages, params, config = self._start_run(input, config, stop, kwargs, CallbackManager)
        (run_manager,) = manager.on_chat_model_start(
            self._serialized,
            [messages],
            invocation_params=params,
            options={"stop": stop, **kwargs},
            name=config.get("run_name"),
            run_id=config.pop("run_id", None),
            batch_size=1,
        )
        chunks: list[ChatGenerationChunk] = []
        try:
            for chunk in self._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
                chunk.message.id = chunk.message.id or f"{LC_ID_PREFIX}-{run_manager.run_id}"
                chunks.append(chunk)
                yield chunk.message  # type: ignore[misc]
        except BaseException as exc:
            merged = merge_chat_generation_chunks(chunks)
            run_manager.on_llm_error(exc, response=LLMResult(generations=[[merged]] if merged else []))
            raise
        run_manager.on_llm_end(LLMResult(generations=[[merge_chat_generation_chunks(chunks)]]))  # type: ignore[list-item]

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        if self.retriever is None:
            async for message in super().astream(input, config, stop=stop, **kwargs):
                yield message
            return
        manager, messages, params, config = self._start_run(input, config, stop, kwargs, AsyncCallbackManager)
        (run_manager,) = await manager.on_chat_model_start(
            self._serialized,
            [messages],
            invocation_params=params,
            options={"stop": stop, **kwargs},
            name=config.get("run_name"),
            run_id=config.pop("run_id", None),
            batch_size=1,
        )
        chunks: list[ChatGenerationChunk] = []
        try:
            # the base _astream runs the sync _stream in a worker thread with run_manager.get_sync()
            async for chunk in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
                chunk.message.id = chunk.message.id or f"{LC_ID_PREFIX}-{run_manager.run_id}"
                chunks.append(chunk)
                yield chunk.message  # type: ignore[misc]
        except BaseException as exc:
            merged = merge_chat_generation_chunks(chunks)
            await run_manager.on_llm_error(exc, response=LLMResult(generations=[[merged]] if merged else []))
            raise
        await run_manager.on_llm_end(LLMResult(generations=[[merge_chat_generation_chunks(chunks)]]))  # type: ignore[list-item]
