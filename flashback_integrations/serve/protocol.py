"""The OpenAI request bodies the server accepts, as pydantic models that refuse unknown fields.

Every field OpenAI defines for ``/v1/chat/completions`` and ``/v1/completions`` is declared: the ones the
engine serves are passed on, the ones it cannot honour (``n > 1``, penalties, ``logit_bias``, ``echo``...)
are refused with a 400 that says so, never dropped. FlashBack's own settings travel in one extra body field,
``flashback`` (the openai SDK's ``extra_body={"flashback": {...}}``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import FlashBackConfig
from ..errors import ConfigError

CONFIG_FIELDS = tuple(FlashBackConfig.__dataclass_fields__)
OPTION_ALIASES = {"tail": "tail_tokens"}
"""Short names the issue and the docs use, mapped to ``FlashBackConfig``'s."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """What both endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters, accepted top-level as vLLM does
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    """vLLM's and llama-server's: generate ``max_tokens`` whatever the model says (benchmarks)."""
    flashback: dict[str, Any] | None = None

    def unsupported(self) -> None:
        """Fields OpenAI defines that this server cannot honour: a 400 naming each, not a silent drop."""
        if self.n not in (None, 1):
            raise ConfigError("n must be 1: the server returns one choice per request (send n requests instead).")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ConfigError(f"{name} is not supported; use repetition_penalty (vLLM's name) instead.")
        if self.logit_bias:
            raise ConfigError("logit_bias is not supported; use response_format or tools to constrain the output.")

    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens not in (None, self.max_tokens):
            raise ConfigError("max_tokens and max_completion_tokens differ; send max_completion_tokens only.")
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Chat-template dicts: text parts joined, ``developer`` read as ``system``, call arguments parsed."""
        out: list[dict[str, Any]] = []
        for i, m in enumerate(self.messages):
            content = (
                m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            )
            entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            if m.tool_calls:
                if m.role != "assistant":
                    raise ConfigError(f"messages[{i}]: only an assistant message may carry tool_calls.")
                entry["tool_calls"] = [_call_dict(i, c) for c in m.tool_calls]
            if m.role == "tool":
                if not m.tool_call_id:
                    raise ConfigError(f"messages[{i}]: a tool message needs the tool_call_id it answers.")
                entry["tool_call_id"] = m.tool_call_id
                if m.name:
                    entry["name"] = m.name
            elif m.tool_call_id is not None:
                raise ConfigError(f"messages[{i}]: tool_call_id belongs on a tool message only.")
            out.append(entry)
        return out


def _call_dict(i: int, call: ToolCallIn) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"messages[{i}]: tool call {call.function.name!r} has arguments that are not JSON.") from exc
    return {"type": "function", "id": call.id, "function": {"name": call.function.name, "arguments": arguments}}


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise ConfigError("echo=true is not supported: the response holds the completion only.")
        if self.best_of not in (None, 1):
            raise ConfigError("best_of must be 1.")
        if self.suffix:
            raise ConfigError("suffix (fill-in-the-middle) is not supported.")

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ConfigError(f"prompt holds {len(prompt)} prompts; send one per request.")
            prompt = prompt[0]
        if not prompt:
            raise ConfigError("prompt is empty.")
        return prompt  # type: ignore[return-value]


def flashback_options(options: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """(the collection named, ``FlashBackConfig`` changes) from a request's ``flashback`` field."""
    if not options:
        return None, {}
    changes: dict[str, Any] = {}
    collection = None
    for key, value in options.items():
        name = OPTION_ALIASES.get(key, key)
        if name == "collection":
            if not isinstance(value, str) or not value:
                raise ConfigError("flashback.collection must be a collection name.")
            collection = value
        elif name in CONFIG_FIELDS:
            changes[name] = value
        else:
            known = ", ".join(("collection", *CONFIG_FIELDS))
            raise ConfigError(f"flashback.{key} is not a setting; the field takes: {known}.")
    return collection, changes
