"""Engine events -> OpenAI response bodies and stream chunks (chat completions and legacy completions).

What OpenAI has no field for travels in ``flashback``: each response's retrievals (as the framework
classes report them), the layout that ran and why, and the backend. In a stream each retrieval is its own
chunk (an empty delta plus ``flashback.retrieval``, SSE event ``flashback.retrieval``), so the openai SDK
and LangChain read it as a valid chunk and a raw SSE reader can pick it out by name."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..events import GenerationResult, Retrieval, TokenLogprob, logprobs_payload
from ..tools import CallStream, InvalidToolCall, ToolCall, parse_tool_calls

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n".encode()


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def flashback_info(result: GenerationResult, retrievals: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "mode": result.mode,
        "mode_reason": result.mode_reason,
        "backend": result.backend,
        "forward_tokens": result.forward_tokens,
        "question_retrieval": result.question.payload() if result.question is not None else None,
    }
    if retrievals:
        info["retrievals"] = [r.payload() for r in result.retrievals]
    return info


def _openai_call(call: ToolCall | InvalidToolCall) -> dict[str, Any]:
    """OpenAI's call object; an unparsable call keeps its raw text as ``arguments`` (OpenAI's arguments are
    a string the client parses, and LangChain reports such a call in ``invalid_tool_calls``)."""
    arguments = json.dumps(call.arguments) if isinstance(call, ToolCall) else call.text
    return {"id": call.id, "type": "function", "function": {"name": call.name or "", "arguments": arguments}}


def legacy_logprobs(tokenizer: Any, entries: list[TokenLogprob], start: int = 0) -> dict[str, Any]:
    """``/v1/completions``' logprobs: parallel lists of tokens, their log-probabilities, the top
    alternatives (token -> log-probability) and each token's offset in the text."""
    tokens, offsets, offset = [], [], start
    for e in entries:
        piece = tokenizer.decode([e.token_id])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


@dataclass
class Reply:
    """One response being built: its id, what it reports, and how its chunks look."""

    kind: str  # "chat" | "completion"
    model: str
    tokenizer: Any
    tools: list[dict[str, Any]] | None = None
    include_usage: bool = False
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))
    calls: CallStream | None = None
    made_calls: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        if self.tools:
            self.calls = CallStream(id_prefix=f"call_{uuid.uuid4().hex[:12]}", tools=self.tools)

    # ------------------------------------------------------------------ streaming
    def _chunk(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        base = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**base, "choices": [choice] if choice is not None else [], **extra}

    def _choice(self, delta: dict[str, Any] | str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self) -> list[bytes]:
        if self.kind != "chat":
            return []
        return [sse(self._chunk(self._choice({"role": "assistant", "content": ""})))]

    def token(self, text: str, logprob: TokenLogprob | None) -> list[bytes]:
        lp = None
        if logprob is not None:
            lp = (
                logprobs_payload(self.tokenizer, [logprob])
                if self.kind == "chat"
                else legacy_logprobs(self.tokenizer, [logprob], self.offset)
            )
        self.offset += len(text)
        if self.kind != "chat":
            return [sse(self._chunk(self._choice(text, logprobs=lp)))] if text or lp else []
        pieces: list[Any] = list(self.calls.feed(text)) if self.calls is not None else ([text] if text else [])
        out = [
            sse(self._chunk(self._choice(self._delta(p), logprobs=lp if i == 0 else None)))
            for i, p in enumerate(pieces)
        ]
        if not pieces and lp is not None:
            out.append(sse(self._chunk(self._choice({}, logprobs=lp))))
        return out

    def _delta(self, piece: str | ToolCall | InvalidToolCall) -> dict[str, Any]:
        if isinstance(piece, str):
            return {"content": piece}
        index, self.made_calls = self.made_calls, self.made_calls + 1
        return {"tool_calls": [{"index": index, **_openai_call(piece)}]}

    def retrieval(self, retrieval: Retrieval) -> bytes:
        choice = self._choice({} if self.kind == "chat" else "")
        return sse(self._chunk(choice, flashback={"retrieval": retrieval.payload()}), event="flashback.retrieval")

    def closing(self, result: GenerationResult) -> list[bytes]:
        out = []
        if self.calls is not None:
            out += [sse(self._chunk(self._choice(self._delta(p)))) for p in self.calls.close()]
        finish = "tool_calls" if self.made_calls else FINISH[result.finish_reason]
        out.append(
            sse(
                self._chunk(
                    self._choice({} if self.kind == "chat" else "", finish), flashback=flashback_info(result, False)
                )
            )
        )
        if self.include_usage:
            out.append(sse(self._chunk(None, usage=usage(result))))
        out.append(sse("[DONE]"))
        return out

    # ------------------------------------------------------------------ whole
    def body(self, result: GenerationResult) -> dict[str, Any]:
        finish = FINISH[result.finish_reason]
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            if self.tools:
                parsed = parse_tool_calls(result.text, id_prefix=f"call_{uuid.uuid4().hex[:12]}", tools=self.tools)
                calls = [_openai_call(c) for c in (*parsed.calls, *parsed.invalid)]
                if calls:
                    message = {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}
                    finish = "tool_calls"
            lp = {
                "logprobs": logprobs_payload(self.tokenizer, result.logprobs) if result.logprobs is not None else None
            }
            choice = {"index": 0, "message": message, **lp, "finish_reason": finish}
            obj = "chat.completion"
        else:
            lp = legacy_logprobs(self.tokenizer, result.logprobs) if result.logprobs is not None else None
            choice = {"index": 0, "text": result.text, "logprobs": lp, "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(result),
            "flashback": flashback_info(result),
        }
