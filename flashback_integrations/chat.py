"""Chat prompts through the tokenizer's template, with message text kept as text.

A template renders messages into one string, and tokenizing that string parses every control token in it
(``<|im_end|>``, ``<|im_start|>system``), the ones a user typed included: a message could open a system or
assistant turn of its own. Here each message's text is rendered as a placeholder and tokenized on its own
with the control tokens split into plain text, so only the template makes turns."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .engine.layout import check_utf8, encode_text, passage_segments
from .errors import ConfigError
from .events import Retrieval
from .tools import (
    Grammar,
    call_grammar,
    check_tools,
    chosen_tools,
    fallback_messages,
    schema_hint,
    template_supports_tools,
)


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


def merge_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent plain messages of one role merged into one turn (templates expect alternating turns); an
    assistant message with tool calls and each tool result stay their own message."""
    out: list[dict[str, Any]] = []
    for entry in messages:
        plain = set(entry) == {"role", "content"} and entry["role"] != "tool"
        if plain and out and out[-1]["role"] == entry["role"] and set(out[-1]) == {"role", "content"}:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + entry["content"]}
        else:
            out.append(dict(entry))
    return out


@dataclass
class ChatCall:
    """One chat call made ready for the engine: what every chat front end (LangChain, the server) sends."""

    prompt_ids: list[int]
    grammar: Grammar | None
    tools: list[dict[str, Any]] | None
    """The tools whose calls are parsed from the output (None: the answer is text)."""
    first_query: str | None
    """The last user message: the first retrieval's query (never the template's text)."""
    question: Retrieval | None = None
    """The question's passages put into the prompt (``question_passages``), or None."""


def prepare_chat(
    fb: Any,
    messages: Sequence[dict[str, Any]],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = False,
    response_grammar: Grammar | None = None,
    hint: bool = True,
    retriever: Any = None,
    config: Any = None,
) -> ChatCall:
    """Prompt ids, grammar and parsed tools of a chat call. A required call (``tool_choice`` "required", "any"
    or a name) is written under a grammar; ``"none"`` hides the tools; a JSON-schema answer gets the schema
    stated after the last user turn (``hint``), since a small model told nothing fills the shape poorly."""
    bound = check_tools(tools) if tools is not None else None
    if bound is not None and tool_choice == "none":
        bound = None  # answer in text: the tools are not shown and nothing is parsed
    grammar = response_grammar
    if bound and (forced := chosen_tools(bound, tool_choice)):
        grammar = call_grammar(forced, parallel=parallel_tool_calls)
    chat = list(messages)
    users = [m["content"] for m in chat if isinstance(m, dict) and m.get("role") == "user"]
    question = None
    k = config.question_k(chat=bool(users), retriever=retriever) if config is not None else 0
    if k:
        if not users:
            raise ConfigError("question_passages needs a user message to retrieve for.")
        context, question = question_context(fb.tokenizer, users[-1], retriever, config.replace(question_passages=k))
        last = max(i for i, m in enumerate(chat) if m.get("role") == "user")
        chat[last] = {**chat[last], "content": with_context(context, users[-1])}
    if grammar is not None and grammar is response_grammar and grammar.kind == "json_schema" and not bound and hint:
        chat = schema_hint(chat, json.loads(grammar.source))
    return ChatCall(fb.chat_ids(chat, tools=bound), grammar, bound, users[-1] if users else None, question)


def question_context(tokenizer: Any, question: str, retriever: Any, config: Any) -> tuple[list[str], Retrieval]:
    """The question's top ``config.question_passages`` passages, each cut to ``max_doc_tokens`` tokens, under the
    call's timeout and error policy (``skip``: no context, the error recorded)."""
    from .retrieval import as_retrieve_fn
    from .retrieval.guard import GuardedRetriever

    if retriever is None:
        raise ConfigError(
            f"question_passages={config.question_passages} needs a retriever to find the question's passages."
        )
    guard = GuardedRetriever(as_retrieve_fn(retriever), config.replace(num_passages=config.question_passages))
    passages, latency, error = guard(question)
    cut = [tokenizer.decode(ids) for ids in passage_segments(tokenizer, passages, config.max_doc_tokens, None)]
    return cut, Retrieval(step=0, query=question, passages=passages, latency_s=latency, error=error)


def with_context(context: Sequence[str], text: str) -> str:
    """The passages before the question, as a stuff chain's prompt puts them."""
    if not context:
        return text
    return "Context:\n" + "\n\n".join(context) + "\n\n" + text


def text_with_passages(tokenizer: Any, prompt: Any, retriever: Any, config: Any, query: str | None) -> tuple:
    """A text prompt with the question's passages before it; (prompt, None) when ``question_passages`` is 0."""
    k = config.question_k(chat=False, retriever=retriever)
    if not k:
        return prompt, None
    if not isinstance(prompt, str):
        raise ConfigError(
            "question_passages puts passages into the prompt's text: give a text prompt (or chat messages through "
            "a chat model), not token ids."
        )
    context, question = question_context(tokenizer, query or prompt, retriever, config.replace(question_passages=k))
    return with_context(context, prompt), question


def reporting_question(events: Iterator[Any], question: Retrieval | None) -> Iterator[Any]:
    """The engine's events with the chat's question retrieval on the final result (the engine saw only ids)."""
    for event in events:
        if question is not None and hasattr(event, "result"):
            event.result.question = question
        yield event
