"""``ChatFlashBack``: a LangChain chat model on ``BaseChatModel`` with FlashBack retrieval."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import BaseModel

from ..chat import prepare_chat, reporting_question
from ..errors import ConfigError
from ..events import FinishEvent, GenerationResult, TokenEvent, final_result, logprobs_payload
from ..tools import CallStream, ToolCall, check_tools, chosen_tools, parse_tool_calls
from ._common import EventBridge, FlashBackSettings, RunRetriever
from ._messages import (
    json_schema_of,
    lc_tool_call_chunk,
    lc_tool_calls,
    response_grammar,
    to_chat_messages,
)


def _usage(result: GenerationResult) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


class ChatFlashBack(FlashBackSettings, BaseChatModel):
    """A chat model that retrieves every ``stride`` tokens while it answers.

    The first retrieval's query is the last user message; later ones are the last ``query_tokens``
    tokens, as docs/method.md specifies. Calls are independent (each has its own KV cache), so ``batch``
    and threads run in parallel with the same outputs as sequential calls.
    """

    default_tool_choice: Literal["auto", "any", "first"] = "auto"
    """``tool_choice`` when ``bind_tools`` was given none. ``"first"`` suits small models not trained
    to decide when to call (the default SmolLM2-135M never calls on its own): a call is required
    until a tool result follows the last user message, then the model answers from it."""
    streaming: bool = False
    """``invoke`` streams underneath (LangChain's convention: callbacks get each token)."""

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
        tools, tool_choice = kwargs.pop("tools", None), kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", None)
        response_format = kwargs.pop("response_format", None)
        kwargs.pop("ls_structured_output_format", None)  # tracing metadata only (our own stream())
        if tools is not None and tool_choice is None:
            tool_choice = self._default_choice(messages)
        hint = (
            (response_format or {}).get("json_schema", {}).get("hint", True)
            if isinstance(response_format, dict)
            else True
        )
        retriever = RunRetriever(self.retriever, run_manager) if self.retriever is not None else None
        options = self.generation_kwargs(stop, **kwargs)
        call = prepare_chat(
            fb,
            to_chat_messages(messages),
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=bool(parallel),
            response_grammar=response_grammar(response_format) if response_format is not None else None,
            hint=hint,
            retriever=retriever,
            config=options["config"],
        )
        options["config"] = options["config"].replace(question_passages=0)  # in the prompt now
        events = fb.stream(
            call.prompt_ids,
            retriever,
            callbacks=[EventBridge(run_manager)],
            grammar=call.grammar,
            first_query=options.pop("first_query", call.first_query),
            **options,
        )
        events = reporting_question(events, call.question)
        return events, name, fb, call.tools or None

    def _default_choice(self, messages: list[BaseMessage]) -> str:
        """``default_tool_choice`` for a call that names none; ``"first"``: a call is required until
        a tool result follows the last user message, then the model answers freely."""
        if self.default_tool_choice != "first":
            return self.default_tool_choice
        last_user = max((i for i, m in enumerate(messages) if m.type == "human"), default=-1)
        return "auto" if any(m.type == "tool" for m in messages[last_user + 1 :]) else "any"

    def _metadata(self, result: GenerationResult, name: str, fb: Any) -> dict[str, Any]:
        metadata = {
            "model_name": name,
            "model_provider": "flashback",
            "finish_reason": result.finish_reason,
            "retrievals": [r.payload() for r in result.retrievals],
            "mode": result.mode,
            "mode_reason": result.mode_reason,
            "backend": result.backend,
            "question_retrieval": result.question.payload() if result.question is not None else None,
        }
        if result.logprobs is not None:
            metadata["logprobs"] = logprobs_payload(fb.tokenizer, result.logprobs)
        return metadata

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        events, name, fb, tools = self._run(messages, stop, run_manager, **kwargs)
        result = final_result(events)
        content, calls = result.text, {}
        if tools:
            parsed = parse_tool_calls(result.text, id_prefix=f"call_{uuid.uuid4().hex[:12]}", tools=tools)
            content, calls = parsed.content, lc_tool_calls(parsed)
        metadata = self._metadata(result, name, fb)
        if calls.get("tool_calls"):
            metadata["finish_reason"] = "tool_calls"
        message = AIMessage(content=content, usage_metadata=_usage(result), response_metadata=metadata, **calls)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self.model})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        events, name, fb, tools = self._run(messages, stop, run_manager, **kwargs)
        calls = CallStream(id_prefix=f"call_{uuid.uuid4().hex[:12]}", tools=tools) if tools else None
        made_calls, errors = 0, []

        def chunks(pieces: Any, logprob: Any = None) -> Iterator[ChatGenerationChunk]:
            nonlocal made_calls
            for piece in pieces:
                if isinstance(piece, str):
                    message = AIMessageChunk(content=piece)
                else:
                    index = made_calls + len(errors)  # one index per block: LangChain merges equal indices
                    message = AIMessageChunk(content="", tool_call_chunks=[lc_tool_call_chunk(piece, index)])
                    if isinstance(piece, ToolCall):
                        made_calls += 1
                    else:
                        errors.append({"id": piece.id, "error": piece.error})
                if logprob is not None:  # on the chunk its token produced; merged by LangChain's aggregation
                    message.response_metadata = {"logprobs": logprobs_payload(fb.tokenizer, [logprob])}
                    logprob = None
                chunk = ChatGenerationChunk(message=message)
                if run_manager is not None and isinstance(piece, str):
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            if logprob is not None:
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="", response_metadata={"logprobs": logprobs_payload(fb.tokenizer, [logprob])}
                    )
                )

        for event in events:
            if isinstance(event, TokenEvent) and (event.text or event.logprob is not None):
                pieces = calls.feed(event.text) if calls is not None else [event.text] if event.text else []
                yield from chunks(pieces, event.logprob)
            elif isinstance(event, FinishEvent):
                if calls is not None:
                    yield from chunks(calls.close())
                metadata = self._metadata(event.result, name, fb)
                metadata.pop("logprobs", None)  # already on the token chunks
                if made_calls:
                    metadata["finish_reason"] = "tool_calls"
                if errors:
                    metadata["tool_call_errors"] = errors
                last = AIMessageChunk(
                    content="",
                    usage_metadata=_usage(event.result),
                    response_metadata=metadata,
                    chunk_position="last",
                )
                yield ChatGenerationChunk(message=last)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools the model may call (``tool_choice="auto"``), must call (``"any"``/``"required"``, or a
        tool's name), or must not (``"none"``). A required call is written under a grammar, so it always
        parses, even on a 135M model; ``parallel_tool_calls=True`` lets a required turn hold several."""
        formatted = check_tools([convert_to_openai_tool(t) for t in tools])
        chosen_tools(formatted, tool_choice if tool_choice != "none" else None)  # a wrong name fails here
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Output that validates against ``schema`` (pydantic, TypedDict, JSON schema): ``json_schema``
        constrains the answer itself, ``function_calling`` forces a call of a tool built from the schema,
        ``json_mode`` any JSON object (describe the fields in the prompt)."""
        kwargs.pop("strict", None)  # constrained decoding is always strict
        if kwargs:
            raise ConfigError(f"with_structured_output got unknown arguments {sorted(kwargs)}.")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        # converted here, as BaseChatModel does it, so our own stream() reports the same options
        try:
            traced = convert_to_json_schema(schema)
        except ValueError:  # a schema dict without a title: LangChain traces it as given
            traced = schema
        tracing = {"kwargs": {"method": method}, "schema": traced}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=tracing)
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            # json_mode: the prompt describes the fields (no schema added to it), but the grammar still
            # holds the output to the schema, so it validates; with a dict schema, any JSON object
            grammar_schema = json_schema_of(schema)
            response_format = {"type": "json_schema", "json_schema": {"schema": grammar_schema}}
            if method == "json_mode":
                response_format["json_schema"]["hint"] = False
            response_grammar(response_format)  # a schema the grammar library rejects fails here
            llm = self.bind(response_format=response_format, ls_structured_output_format=tracing)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ConfigError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}.")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

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

    @staticmethod
    def _run_start(params: dict[str, Any], stop: Any, kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
        """What ``on_chat_model_start`` gets besides the messages (as ``BaseChatModel.stream`` passes it)."""
        return {
            "invocation_params": params,
            "options": {"stop": stop, **kwargs},
            "name": config.get("run_name"),
            "run_id": config.pop("run_id", None),
            "batch_size": 1,
        }

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
            self._serialized, [messages], **self._run_start(params, stop, kwargs, config)
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
            self._serialized, [messages], **self._run_start(params, stop, kwargs, config)
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
