"""``FlashBackLLM`` for LlamaIndex: a function-calling LLM that retrieves every ``stride`` tokens.

Chat models (a tokenizer with a chat template) chat through the template, tools included; base
models (GPT-2, OPT, ...) report ``is_chat_model=False`` and chat through ``complete``. Structured
prediction (``structured_predict``, ``as_structured_llm``) writes under a JSON-schema grammar, so
it validates whatever the model; the async methods run generation in a worker thread and never block
the event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms import types as llm_types
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    LogProb,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.schema import NodeWithScore

from ..chat import question_context, reporting_question, with_context
from ..errors import ConfigError
from ..events import Event, FinishEvent, GenerationResult, TokenEvent, TokenLogprob, final_result
from ..settings import CONFIG_FIELDS, FlashBackSettings
from ..tools import Grammar, call_grammar, check_tools, closed, parse_tool_calls, schema_hint
from .events import LlamaIndexBridge, passage_to_node

_READ_BLOCKS: tuple[type, ...] = (TextBlock, ToolCallBlock)
_HINT_BLOCKS: tuple[type, ...] = tuple(
    getattr(llm_types, name) for name in ("ThinkingBlock", "CachePoint", "CacheControl") if hasattr(llm_types, name)
)
"""Blocks that carry no content for the reader (an earlier turn's reasoning, a provider's cache hint)."""


def chat_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages -> chat-template dicts. Adjacent plain messages of one role are merged;
    an assistant turn's tool calls (``ToolCallBlock``s) and each tool result stay their own message."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        unread = [type(b).__name__ for b in message.blocks if not isinstance(b, _READ_BLOCKS + _HINT_BLOCKS)]
        if unread:
            raise ValueError(
                f"message {i} holds {', '.join(sorted(set(unread)))}: FlashBackLLM reads text (and tool calls) only, "
                "so it would be dropped. Put its content into the message as text, or use a multimodal LLM."
            )
        text = "".join(b.text for b in message.blocks if isinstance(b, TextBlock))
        entry: dict[str, Any] = {"role": role, "content": text}
        calls = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
        if calls:
            entry["tool_calls"] = [
                {
                    "type": "function",
                    "id": c.tool_call_id,
                    "function": {
                        "name": c.tool_name,
                        "arguments": c.tool_kwargs if isinstance(c.tool_kwargs, dict) else json.loads(c.tool_kwargs),
                    },
                }
                for c in calls
            ]
        if role == "tool":
            entry["tool_call_id"] = message.additional_kwargs.get("tool_call_id")
        if len(entry) == 2 and role != "tool" and out and out[-1]["role"] == role and len(out[-1]) == 2:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append(entry)
    return out


def _logprobs(tokenizer: Any, entries: Sequence[TokenLogprob] | None) -> list[list[LogProb]] | None:
    """LlamaIndex's logprobs: per generated token, the token itself then its ``top_logprobs`` alternatives."""
    if entries is None:
        return None

    def one(token_id: int, logprob: float) -> LogProb:
        text = tokenizer.decode([token_id])
        return LogProb(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    return [[one(e.token_id, e.logprob), *(one(i, lp) for i, lp in e.top)] for e in entries]


async def _in_thread(gen: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a blocking generator in a worker thread; items reach the event loop as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def pump() -> None:
        try:
            for item in gen:
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

    threading.Thread(target=pump, daemon=True, name="flashback-llamaindex-stream").start()
    while True:
        kind, value = await queue.get()
        if kind == "item":
            yield value
        elif kind == "error":
            raise value
        else:
            return


class FlashBackLLM(FlashBackSettings, FunctionCallingLLM):
    """A local causal LM with FlashBack retrieval during generation, for LlamaIndex.

    Without a ``retriever`` it is a plain local LLM (e.g. as the ``llm`` of a stock query engine or a
    ``FunctionAgent``). ``metadata.context_window`` leaves room for the retrieval blocks, so
    synthesizers do not over-pack the prompt.
    """

    @classmethod
    def class_name(cls) -> str:
        return "FlashBackLLM"

    @property
    def metadata(self) -> LLMMetadata:
        fb = self.flashback()
        window = self.prompt_window()
        chat = bool(getattr(fb.tokenizer, "chat_template", None))
        return LLMMetadata(
            context_window=window,
            num_output=self.max_new_tokens,
            is_chat_model=chat,
            is_function_calling_model=chat,
            model_name=self.model_label(),
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
        grammar = kwargs.pop("grammar", None)
        bridge = LlamaIndexBridge(
            span_id=active_span_id.get(),  # captured now: inside a stream generator the span is gone
            callback_manager=self.callback_manager,
            legacy=not isinstance(self.retriever, BaseRetriever),
            collect=collect,
        )
        gen = self.generation_kwargs(stop, first_query=first_query, **kwargs)
        return fb.stream(prompt, self.retriever, callbacks=[bridge], grammar=grammar, **gen)

    @staticmethod
    def _raw(result: GenerationResult) -> dict[str, Any]:
        return {
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "retrievals": result.retrievals,
            "mode": result.mode,
            "mode_reason": result.mode_reason,
            "question_retrieval": result.question.payload() if result.question is not None else None,
            "backend": result.backend,
        }

    def _chat_prompt(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> tuple[Any, str | None]:
        """Prompt ids (through the chat template, with any ``tools``) or, for a base model, text; and the
        first retrieval's query. ``tools``/``tool_required`` become a grammar when a call is required."""
        tools = kwargs.pop("tools", None)
        required = kwargs.pop("tool_required", False)
        parallel = kwargs.pop("allow_parallel_tool_calls", False)
        dicts = chat_dicts(messages)
        if self.system_prompt and not any(d["role"] == "system" for d in dicts):
            dicts.insert(0, {"role": "system", "content": self.system_prompt})
        users = [d["content"] for d in dicts if d["role"] == "user"]
        question = users[-1] if users else None
        if kwargs.get("schema_hint") is not None:
            dicts = schema_hint(dicts, kwargs.pop("schema_hint"))
        if not self.metadata.is_chat_model:
            if tools:
                raise ConfigError(f"{self.model_label()!r} has no chat template, so it cannot be given tools.")
            return self.messages_to_prompt(messages), question
        if tools:
            tools = check_tools(tools)
            kwargs["_tools"] = tools
            if required:
                kwargs["grammar"] = call_grammar(tools, parallel=parallel)
        config = self.flashback_config().replace(**{k: kwargs[k] for k in CONFIG_FIELDS if k in kwargs})
        k = config.question_k(chat=True, retriever=self.retriever)
        if k and question is not None:  # into the user turn, as a stuff chain does
            context, kwargs["_question"] = question_context(
                self.flashback().tokenizer, question, self.retriever, config.replace(question_passages=k)
            )
            last = max(i for i, d in enumerate(dicts) if d["role"] == "user")
            dicts[last] = {**dicts[last], "content": with_context(context, question)}
            kwargs["question_passages"] = 0
        return self.flashback().chat_ids(dicts, tools=tools or None), question

    def _chat_response(self, result: GenerationResult, tools: list[dict[str, Any]] | None) -> ChatResponse:
        blocks: list[Any] = []
        text = result.text
        extra: dict[str, Any] = {}
        if tools:
            parsed = parse_tool_calls(result.text, id_prefix=f"call_{uuid.uuid4().hex[:12]}", tools=tools)
            text = parsed.content
            blocks = [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in parsed.calls]
            if parsed.invalid:
                extra["invalid_tool_calls"] = [
                    {"id": c.id, "name": c.name, "text": c.text, "error": c.error} for c in parsed.invalid
                ]
        message = ChatMessage(
            role=MessageRole.ASSISTANT, blocks=[TextBlock(text=text), *blocks], additional_kwargs=extra
        )
        return ChatResponse(
            message=message, raw=self._raw(result), logprobs=_logprobs(self.flashback().tokenizer, result.logprobs)
        )

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, **kwargs)

    def _complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        result = final_result(self.run(prompt, **kwargs))
        return CompletionResponse(
            text=result.text, raw=self._raw(result), logprobs=_logprobs(self.flashback().tokenizer, result.logprobs)
        )

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        return self._completion_gen(self.run(prompt, **kwargs))

    def _deltas(self, events: Iterator[Event]) -> Iterator[tuple[str, str, Any, GenerationResult | None]]:
        """(text so far, delta, logprobs, None) per token, then (text, "", None, result): what both the
        completion and the chat stream are made of."""
        text = ""
        tokenizer = self.flashback().tokenizer
        for event in events:
            if isinstance(event, TokenEvent) and (event.text or event.logprob is not None):
                text += event.text
                logprobs = _logprobs(tokenizer, [event.logprob]) if event.logprob is not None else None
                yield text, event.text, logprobs, None
            elif isinstance(event, FinishEvent):
                yield text, "", None, event.result

    def _completion_gen(self, events: Iterator[Event]) -> CompletionResponseGen:
        for text, delta, logprobs, result in self._deltas(events):
            if result is None:
                yield CompletionResponse(text=text, delta=delta, logprobs=logprobs)
            else:
                yield CompletionResponse(text=text, delta="", raw=self._raw(result))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        events = self.run(prompt, **kwargs)  # validated here, in the caller's task
        return _in_thread(self._completion_gen(events))

    # ------------------------------------------------------------------ chat
    def _chat(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[Iterator[Event], list[dict[str, Any]] | None]:
        prompt, question = self._chat_prompt(messages, kwargs)
        tools, asked = kwargs.pop("_tools", None), kwargs.pop("_question", None)
        if asked is not None and kwargs.get("collect") is not None:  # a query engine's source nodes
            kwargs["collect"].extend(passage_to_node(p, 0) for p in asked.passages)
        return reporting_question(self.run(prompt, first_query=question, **kwargs), asked), tools

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        events, tools = self._chat(messages, kwargs)
        return self._chat_response(final_result(events), tools)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        events, tools = self._chat(messages, kwargs)
        return self._chat_gen(events, tools)

    def _chat_gen(self, events: Iterator[Event], tools: list[dict[str, Any]] | None = None) -> ChatResponseGen:
        """Text deltas as they come; with tools, the calls are parsed from the whole text at the end
        (the last response carries them, as LlamaIndex's agents read the last one)."""
        for text, delta, logprobs, result in self._deltas(events):
            if result is None:
                message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
                yield ChatResponse(message=message, delta=delta, logprobs=logprobs)
            else:
                final = self._chat_response(result, tools)
                final.delta, final.logprobs = "", None
                yield final

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        events, tools = self._chat(messages, kwargs)
        result = await asyncio.to_thread(final_result, events)
        return self._chat_response(result, tools)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        events, tools = self._chat(messages, kwargs)
        return _in_thread(self._chat_gen(events, tools))

    # ------------------------------------------------------------------ tools
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """LlamaIndex tools as OpenAI-format tools for the chat template; ``tool_required`` forces a
        call with a grammar, so it always parses."""
        specs = [t.metadata.to_openai_tool() for t in tools]
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        return {
            "messages": messages,
            "tools": specs or None,
            "tool_required": tool_required,
            "allow_parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[Any]:
        from llama_index.core.tools import ToolSelection

        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            invalid = response.message.additional_kwargs.get("invalid_tool_calls")
            detail = f"; invalid call: {invalid[0]['error']}" if invalid else ""
            raise ValueError(f"Expected at least one tool call, got none{detail}.")
        return [
            ToolSelection(tool_id=c.tool_call_id or "", tool_name=c.tool_name, tool_kwargs=c.tool_kwargs) for c in calls
        ]

    # ------------------------------------------------------------------ structured output
    def _structured(self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None, prompt_args: dict) -> Any:
        """Events for a JSON answer that validates against ``output_cls`` (grammar-constrained)."""
        from pydantic import BaseModel

        if not (isinstance(output_cls, type) and issubclass(output_cls, BaseModel)):
            raise TypeError(
                f"structured_predict needs a pydantic BaseModel class, got {output_cls!r}; wrap the value in one, "
                "e.g. class Answer(BaseModel): value: int."
            )
        kwargs = dict(llm_kwargs or {})
        kwargs["grammar"] = Grammar.json_schema(closed(output_cls.model_json_schema()))
        if self.metadata.is_chat_model:
            kwargs["schema_hint"] = output_cls.model_json_schema()
            return self._chat(prompt.format_messages(**prompt_args), kwargs)[0]
        text = (
            prompt.format(**prompt_args)
            + f"\nAnswer with JSON matching this schema: {output_cls.model_json_schema()}\n"
        )
        return self.run(text, **kwargs)

    def structured_predict(
        self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Any:
        result = final_result(self._structured(output_cls, prompt, llm_kwargs, prompt_args))
        return output_cls.model_validate_json(result.text)

    async def astructured_predict(
        self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Any:
        events = self._structured(output_cls, prompt, llm_kwargs, prompt_args)
        result = await asyncio.to_thread(final_result, events)
        return output_cls.model_validate_json(result.text)
