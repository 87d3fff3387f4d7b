"""LangChain messages in and out: chat-template dicts (with tool calls and tool results), tool calls
parsed from the output into ``AIMessage.tool_calls``/``tool_call_chunks``, and the response format
(JSON schema / JSON mode) turned into the engine's grammar."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.utils.function_calling import convert_to_json_schema

from ..chat import merge_turns
from ..errors import ConfigError
from ..tools import Grammar, InvalidToolCall, ParsedOutput, ToolCall, closed, response_format_grammar

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
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # the same call is in message.tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ConfigError(f"ChatFlashBack reads text only; got a {kind!r} content block.")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> chat-template dicts, turns merged as :func:`~..chat.merge_turns` does."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = _ROLES.get(message.type, message.type)
        entry: dict[str, Any] = {"role": role, "content": _text(message)}
        calls = getattr(message, "tool_calls", None) or []
        if calls:
            entry["tool_calls"] = [
                {"type": "function", "id": c.get("id"), "function": {"name": c["name"], "arguments": c["args"]}}
                for c in calls
            ]
        if role == "tool":
            entry["tool_call_id"] = getattr(message, "tool_call_id", None)
            if getattr(message, "name", None):
                entry["name"] = message.name
        out.append(entry)
    return merge_turns(out)


def lc_tool_calls(parsed: ParsedOutput) -> dict[str, list[Any]]:
    return {
        "tool_calls": [tool_call(name=c.name, args=c.arguments, id=c.id) for c in parsed.calls],
        "invalid_tool_calls": [
            invalid_tool_call(name=c.name, args=c.text, id=c.id, error=c.error) for c in parsed.invalid
        ],
    }


def lc_tool_call_chunk(call: ToolCall | InvalidToolCall, index: int) -> Any:
    """A streamed call, whole. An invalid one carries its raw text as a JSON string: LangChain's chunk
    aggregation parses partial JSON objects into calls, and a string is what it reports in
    ``invalid_tool_calls`` instead (the error itself is in the last chunk's ``tool_call_errors``)."""
    args = json.dumps(call.arguments) if isinstance(call, ToolCall) else json.dumps(call.text)
    return tool_call_chunk(name=call.name, args=args, id=call.id, index=index)


def response_grammar(response_format: Any) -> Grammar:
    """OpenAI's ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
    {"schema": ...}}``), or a pydantic class / TypedDict / JSON schema dict -> a grammar."""
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        grammar = response_format_grammar(response_format)
        assert grammar is not None
        return grammar
    try:
        return Grammar.json_schema(json_schema_of(response_format))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"response_format must be {{'type': 'json_object'}}, {{'type': 'json_schema', ...}}, a pydantic "
            f"model, a TypedDict or a JSON schema dict; got {response_format!r:.120} ({exc})."
        ) from exc


def states_schema(response_format: Any) -> bool:
    """Whether the schema is also told to the model in the prompt (not for ``json_mode``, whose
    prompt describes the fields itself)."""
    spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    return not (isinstance(spec, dict) and spec.get("hint") is False)


def json_schema_of(schema: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic class, TypedDict, function or JSON schema dict, its objects closed
    to extra keys as OpenAI's strict mode does (:func:`~..constrained.closed`)."""
    if isinstance(schema, dict) and "function" not in schema and ("properties" in schema or "type" in schema):
        return closed(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return closed(schema.model_json_schema())
    return closed(convert_to_json_schema(schema))
