"""Tool calling for local chat models, framework-agnostic: tools rendered through the chat template,
calls written and parsed in the Hermes/Qwen format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``),
and a grammar that forces a call when the caller requires one.

Templates with their own ``tools`` support (Qwen2/2.5/3, Hermes, SmolLM3, ...) render the tools and
the ``tool`` messages themselves. For a template without it the tools are described in a system
message, earlier calls are written in the same format and tool results become user turns wrapped in
``<tool_response>``: a model not trained for tools may then ignore them, but a required call still
parses because the grammar writes it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine.constrained import Grammar, closed, schema_hint
from .errors import ConfigError

# the grammar side that framework adapters use for structured output, re-exported with the tool calls
__all__ = ["Grammar", "closed", "schema_hint"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME_RE = re.compile(r'"name"\s*:\s*"([^"\\]+)"')
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class InvalidToolCall:
    """A ``<tool_call>`` block that did not parse: kept with its error, never silently dropped."""

    text: str
    error: str
    id: str
    name: str | None = None


@dataclass
class ParsedOutput:
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    invalid: list[InvalidToolCall] = field(default_factory=list)


def check_tools(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-format tools (``{"type": "function", "function": {"name", "description", "parameters"}}``),
    each parameters schema checked by the grammar library so a bad schema fails before generation."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ConfigError("tools must be a non-empty list of OpenAI-format tool dicts.")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ConfigError(
                f"tool {i} is not an OpenAI function tool ({{'type': 'function', 'function': {{'name': ...}}}}): "
                f"{tool!r:.200}"
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ConfigError(
                f"tool {fn['name']!r}: parameters must be a JSON schema of type object, got {params!r:.200}"
            )
        try:
            Grammar.json_schema(params).compiled()
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"tool {fn['name']!r}: the grammar library rejects its parameters schema: {exc}") from exc
    return list(tools)


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def chosen_tools(tools: Sequence[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]] | None:
    """The tools a call must use (``"any"``/``"required"``/``True``: one of them; a name or
    ``{"type": "function", "function": {"name": ...}}``: that one), or None when the model may answer
    in text (``"auto"``, ``None``)."""
    if tool_choice in (None, "auto", False):
        return None
    if tool_choice in ("any", "required", True):
        return list(tools)
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name", tool_choice.get("name"))
    if not isinstance(name, str):
        raise ConfigError(f"tool_choice must be 'auto', 'any', 'required', 'none' or a tool name, got {tool_choice!r}.")
    picked = [t for t in tools if t["function"]["name"] == name]
    if not picked:
        raise ConfigError(f"tool_choice={name!r} names no bound tool; bound tools: {tool_names(tools)}.")
    return picked


def call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A call of ``tool`` as JSON; its arguments object is closed (no keys beyond the parameters, as
    OpenAI's strict mode): a tool could not take them, and a small model would never stop adding them."""
    fn = tool["function"]
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn["name"]},
            "arguments": closed(fn.get("parameters", {"type": "object", "properties": {}})),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_grammar(tools: Sequence[dict[str, Any]], parallel: bool = False) -> Grammar:
    """A ``<tool_call>`` block calling one of ``tools`` with valid arguments (several with ``parallel``)."""
    schemas = [call_schema(t) for t in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    body = json.dumps({**schema, "x-guidance": options})
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    lark = f'{start}\ncall: "{CALL_OPEN}\\n" json "\\n{CALL_CLOSE}"\njson: %json {body}\n'
    return Grammar.lark(lark)


def response_format_grammar(response_format: dict[str, Any]) -> Grammar | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (no grammar), ``{"type": "json_object"}``, or
    ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` (checked by the grammar library here)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ConfigError("response_format json_schema needs {'json_schema': {'schema': {...}}}.")
        grammar = Grammar.json_schema(closed(schema) if spec.get("strict") else schema)  # strict: no extra keys
        try:
            grammar.compiled()
        except ValueError as exc:
            raise ConfigError(f"the grammar library rejects response_format's schema: {exc}") from exc
        return grammar
    raise ConfigError(
        f"response_format must be {{'type': 'text'}}, {{'type': 'json_object'}} or {{'type': 'json_schema', "
        f"'json_schema': {{'schema': ...}}}}, got {response_format!r:.120}."
    )


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return isinstance(template, str) and "tools" in template


def _fallback_system(tools: Sequence[dict[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t) for t in tools)
    return (
        "You may call these tools:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call one, answer with a JSON object in these tags:\n"
        f'{CALL_OPEN}\n{{"name": <tool name>, "arguments": <arguments object>}}\n{CALL_CLOSE}'
    )


def call_text(calls: Sequence[dict[str, Any]]) -> str:
    """OpenAI-format calls written as the model writes them."""
    blocks = []
    for c in calls:
        body = json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
        blocks.append(f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
    return "\n".join(blocks)


def fallback_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """Messages a template without tool support can render: tools in the system message, calls as
    text, tool results as user turns."""
    out: list[dict[str, str]] = []
    if tools:
        system = _fallback_system(tools)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"] + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join(x for x in (m["content"], call_text(m["tool_calls"])) if x)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            wrapped = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + wrapped}
            else:
                out.append({"role": "user", "content": wrapped})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def bind_call(call: ToolCall, tools: Sequence[dict[str, Any]] | None) -> ToolCall | InvalidToolCall:
    """A parsed call against the tools bound to the request: a call of a tool that was not bound, or with
    arguments its parameters schema rejects, is invalid (LangChain's ``invalid_tool_calls``), never offered
    to an agent as a call it could run. ``tools=None``: nothing bound to check against."""
    if tools is None:
        return call
    text = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    bound = {t["function"]["name"]: t["function"] for t in tools}
    if call.name not in bound:
        return InvalidToolCall(
            text=text,
            error=f"no tool named {call.name!r} was bound (bound: {sorted(bound)})",
            id=call.id,
            name=call.name,
        )
    from jsonschema import exceptions, validators

    schema = bound[call.name].get("parameters", {"type": "object", "properties": {}})
    error = exceptions.best_match(validators.validator_for(schema)(schema).iter_errors(call.arguments))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "arguments"
        return InvalidToolCall(
            text=text,
            error=f"arguments break {call.name!r}'s schema at {where}: {error.message}",
            id=call.id,
            name=call.name,
        )
    return call


def _one_call(body: str, call_id: str, tools: Sequence[dict[str, Any]] | None = None) -> ToolCall | InvalidToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        named = _NAME_RE.search(body)
        return InvalidToolCall(
            text=body, error=f"not JSON: {exc.msg} at character {exc.pos}", id=call_id, name=named and named.group(1)
        )
    name = data.get("name") if isinstance(data, dict) else None
    args = data.get("arguments", data.get("parameters", {})) if isinstance(data, dict) else None
    if isinstance(args, str):  # some templates write the arguments as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args)
    if not isinstance(name, str) or not isinstance(args, dict):
        return InvalidToolCall(
            text=body,
            error="a call must be an object with a string 'name' and an object 'arguments'",
            id=call_id,
            name=name if isinstance(name, str) else None,
        )
    return bind_call(ToolCall(name=name, arguments=args, id=call_id), tools)


def parse_tool_calls(text: str, id_prefix: str = "call", tools: Sequence[dict[str, Any]] | None = None) -> ParsedOutput:
    """Split generated text into content and ``<tool_call>`` blocks; an unclosed block, or a call that
    does not fit the bound ``tools`` (:func:`bind_call`), is invalid."""
    out = ParsedOutput(content="")
    pieces, last = [], 0
    for i, match in enumerate(_CALL_RE.finditer(text)):
        pieces.append(text[last : match.start()])
        last = match.end()
        parsed = _one_call(match.group(1).strip(), f"{id_prefix}_{i}", tools)
        (out.calls if isinstance(parsed, ToolCall) else out.invalid).append(parsed)  # type: ignore[arg-type]
    rest = text[last:]
    if CALL_OPEN in rest:
        before, _, body = rest.partition(CALL_OPEN)
        pieces.append(before)
        out.invalid.append(
            InvalidToolCall(
                text=body,
                error=f"no closing {CALL_CLOSE} (output cut short?)",
                id=f"{id_prefix}_{len(out.calls) + len(out.invalid)}",
            )
        )
    else:
        pieces.append(rest)
    out.content = "".join(pieces).strip()
    return out


class CallStream:
    """Incremental parsing for streaming: text outside calls passes through at once (only a possible
    start of ``<tool_call>`` is held back); each call comes out whole when its block closes."""

    def __init__(self, id_prefix: str = "call", tools: Sequence[dict[str, Any]] | None = None) -> None:
        self._tools = tools
        self._buffer = ""
        self._in_call = False
        self._count = 0
        self._prefix = id_prefix

    def feed(self, delta: str) -> Iterator[str | ToolCall | InvalidToolCall]:
        self._buffer += delta
        while True:
            if not self._in_call:
                at = self._buffer.find(CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, CALL_OPEN)
                    text, self._buffer = (
                        self._buffer[: len(self._buffer) - keep],
                        self._buffer[len(self._buffer) - keep :],
                    )
                    if text:
                        yield text
                    return
                if at:
                    yield self._buffer[:at]
                self._buffer, self._in_call = self._buffer[at + len(CALL_OPEN) :], True
            end = self._buffer.find(CALL_CLOSE)
            if end < 0:
                return
            body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE) :]
            self._in_call = False
            yield _one_call(body.strip(), f"{self._prefix}_{self._count}", self._tools)
            self._count += 1

    def close(self) -> Iterator[str | InvalidToolCall]:
        """What is left at the end: held-back text, or an unclosed call (invalid)."""
        if self._in_call:
            yield InvalidToolCall(
                text=self._buffer,
                error=f"no closing {CALL_CLOSE} (output cut short?)",
                id=f"{self._prefix}_{self._count}",
            )
        elif self._buffer:
            yield self._buffer
        self._buffer = ""


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
