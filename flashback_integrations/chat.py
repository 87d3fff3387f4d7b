"""Chat prompts through the tokenizer's template, with message text kept as text.

A template renders messages into one string, and tokenizing that string parses every control token in it
(``<|im_end|>``, ``<|im_start|>system``), the ones a user typed included: a message could open a system or
assistant turn of its own. Here each message's text is rendered as a placeholder and tokenized on its own
with the control tokens split into plain text, so only the template makes turns."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from .engine.layout import check_utf8, encode_text
from .errors import ConfigError
from .tools import check_tools, fallback_messages, template_supports_tools


def control_tokens(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special ids: its special tokens and special added tokens."""
    found = {t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False) and token.content:
            found.add(token.content)
    return sorted(found, key=len, reverse=True)


def check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError("chat_ids needs a non-empty list of messages ({'role': ..., 'content': ...}).")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(
                f"message {i} must be a dict with a string 'role' and a string 'content', got {m!r:.120}."
            )
        check_utf8(m["content"], f"message {i}'s content")
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
            raise ConfigError(f"message {i}: only an assistant message may carry a tool_calls list.")


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    """Message text: control tokens and marks in it become the ids of their characters."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def chat_template_ids(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
) -> list[int]:
    """Prompt ids of a conversation, ready for the answer; see the module docstring."""
    check_messages(messages)
    tools = check_tools(tools) if tools else None
    uses_tools = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    native = bool(uses_tools and template_supports_tools(tokenizer))
    rendered = list(messages) if native or not uses_tools else fallback_messages(messages, tools)
    controls = control_tokens(tokenizer)
    if native:  # tool schemas and call arguments go through the template itself: they must hold no control token
        structured = json.dumps([tools, [m.get("tool_calls") for m in rendered]], ensure_ascii=False)
        hit = next((c for c in controls if c in structured), None)
        if hit is not None:
            raise ConfigError(f"a tool definition or tool call holds the control token {hit!r}; remove it.")
    extra = {"tools": tools} if native else {}
    if not any(c in m["content"] for m in rendered for c in controls):
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False, **extra)
        return encode_text(tokenizer, text, add_special_tokens=False)
    nonce = secrets.token_hex(8)
    placeholder = re.compile(f"FBTEXT{nonce}N(\\d+)E")
    masked = [{**m, "content": f"FBTEXT{nonce}N{i}E"} for i, m in enumerate(rendered)]
    text = tokenizer.apply_chat_template(masked, add_generation_prompt=True, tokenize=False, **extra)
    ids: list[int] = []
    for i, piece in enumerate(placeholder.split(text)):
        if i % 2:
            ids += _text_ids(tokenizer, rendered[int(piece)]["content"])
        elif piece:
            ids += encode_text(tokenizer, piece, add_special_tokens=False)
    return ids
