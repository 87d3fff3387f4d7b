"""The server backend: the FlashBack loop over an OpenAI-compatible completions server with prefix caching
(llama.cpp's ``llama-server``, vLLM, SGLang).

A server samples for itself, so this backend does not return logits per token: each retrieval stride is one
streamed ``/v1/completions`` request whose prompt is the layout's token ids and whose ``max_tokens`` is the
stride. Within a stride every layout only appends generated tokens to the context, so one request is exactly
the loop's arithmetic; across strides the server's prefix cache keeps the text before the block (append) and
recomputes everything after it, as the torch backend's crop and re-feed does. What the server served from its
cache is read from its own response (``usage.prompt_tokens_details.cached_tokens``, llama.cpp's
``timings.cache_n``), reported per retrieval, and a server that serves nothing from cache is warned about once.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..errors import ConfigError
from .kv import common_prefix
from .layout import MARK_L, MARK_R, MarkIds
from .passages import PassageKVCache
from .sampling import Sampling

PROBE = "FlashBack probe: the json module dumps 12 objects, naïvely."
"""Text tokenized by the server and locally: a different tokenizer (a wrong model) gives other ids."""
SHARED_PREFIX_TO_CHECK = 32
"""A request sharing at least this many leading ids with the previous one should be a prefix-cache hit."""


class ServerError(ConfigError):
    """The server is unreachable, serves another model, or answered something this backend cannot read."""


@dataclass
class StrideChunk:
    """Tokens streamed back by one request, with what the server says it took from its cache."""

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated: int | None = None
    """The server's count of tokens generated so far in this request, when it reports one."""


@dataclass
class ServerStats:
    """Prompt tokens sent and served from the prefix cache, over this backend's life (benchmarks read it)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_request: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=10_000))
    """(prompt tokens, cached tokens) of the latest requests, in order (bounded: a service runs for long)."""


class ServerBackend:
    """A completions server at ``url`` serving ``model`` (the only one it serves when None)."""

    name = "openai"
    places_positions = False
    activated = False
    samples_remotely = True

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        vocab_size: int | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"server_url must be an http(s) URL such as http://127.0.0.1:8080, got {url!r}.")
        self.url = url.rstrip("/").removesuffix("/v1")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.stats = ServerStats()
        self._warned: set[str] = set()
        self._last_prompt: list[int] = []
        self._lock = threading.Lock()
        served = self._served_models()
        ids = [m.get("id") for m in served]
        if model is None:
            if len(ids) != 1:
                raise ServerError(f"{self.url} serves {ids}; pass served_model=... to choose one.")
            model = ids[0]
        elif model not in ids:
            raise ServerError(f"{self.url} does not serve {model!r}; it serves {ids}. Pass one of those.")
        self.model: str = model
        entry = served[ids.index(model)]
        self.context_window: int | None = _context_length(entry)
        meta = entry.get("meta") or {}
        self.vocab_size: int = int(meta.get("n_vocab") or vocab_size or 0)

    # ----------------------------------------------------------------- checks before any generation
    def _served_models(self) -> list[dict[str, Any]]:
        try:
            response = self.client.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise ServerError(
                f"cannot reach a completions server at {self.url} ({type(exc).__name__}: {exc}). Start one (e.g. "
                "`llama-server -m OUT/model.gguf --port 8080`, or `vllm serve OUT`) and pass its URL."
            ) from exc
        if response.status_code == 401:
            raise ServerError(f"{self.url} refused the request (401): set OPENAI_API_KEY to its API key.")
        if response.status_code != 200:
            raise ServerError(f"{self.url}/v1/models answered {response.status_code}: not an OpenAI-compatible server.")
        data = response.json().get("data")
        if not isinstance(data, list) or not data:
            raise ServerError(f"{self.url}/v1/models lists no model: not an OpenAI-compatible server.")
        return data

    def check_model(self, tokenizer: Any, marks: MarkIds | None, source: str) -> None:
        """Refuse a server whose model is not ``source``'s: other ids for the probe text, or no marks where
        ``source`` has them. Servers without ``/tokenize`` are warned about, not refused."""
        local = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
        body = {"model": self.model, "content": PROBE, "prompt": PROBE, "add_special": False}
        answer = self._post_optional("/tokenize", {**body, "add_special_tokens": False})
        if answer is None:
            self._warn_once("tokenize", f"{self.url} has no /tokenize: cannot check that it serves {source!r}.")
        else:
            remote = [t if isinstance(t, int) else t.get("id") for t in answer.get("tokens", [])]
            if remote != local:
                raise ServerError(
                    f"{self.url} ({self.model}) tokenizes text differently from {source!r} ({remote[:8]}... vs "
                    f"{local[:8]}...): it serves another model. Serve the checkpoint or GGUF that "
                    f"`flashback export` wrote for {source!r}."
                )
        if marks is not None:
            answer = self._post_optional("/detokenize", {"model": self.model, "tokens": [marks.left, marks.right]})
            text = None if answer is None else answer.get("content", answer.get("prompt"))
            if text is not None and text.replace(" ", "") != MARK_L + MARK_R:
                raise ServerError(
                    f"{self.url} ({self.model}) has {text!r} at the marking token ids {marks.left}, {marks.right}: "
                    f"a model without the adapter's marks. Serve what `flashback export OUT --adapter A` wrote."
                )

    def _post_optional(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            response = self.client.post(path, json=body, timeout=30.0)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}{path} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (404, 405, 501):
            return None
        if response.status_code != 200:
            raise ServerError(f"{self.url}{path} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def open(self, passages: PassageKVCache | None, fingerprint: Hashable | None) -> ServerBackend:
        return self

    def fingerprint(self) -> Hashable:
        return ("server", self.url, self.model)

    # ----------------------------------------------------------------- one stride
    def complete(
        self,
        ids: Sequence[int],
        max_tokens: int,
        sampling: Sampling,
        banned: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> Iterator[StrideChunk]:
        """Stream up to ``max_tokens`` ids after ``ids``; the last chunk carries the finish reason. Closing
        the iterator early (a stop string) closes the connection, which ends the request on the server."""
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,  # -1: off on llama.cpp and vLLM (their defaults are not)
            "min_p": sampling.min_p or 0.0,
            "logit_bias": {str(i): -100 for i in banned},
            "logprobs": 1,  # the token ids come back through the log-probabilities
            "return_token_ids": True,  # vLLM: ids in each chunk
            "return_tokens_as_token_ids": True,  # vLLM: "token_id:N" in the log-probabilities
            "timings_per_token": True,  # llama.cpp: cache_n in every chunk
            "ignore_eos": ignore_eos,
        }
        if sampling.repetition_penalty != 1.0:
            body.update(repetition_penalty=sampling.repetition_penalty, repeat_penalty=sampling.repetition_penalty)
            body["repeat_last_n"] = -1  # the whole context, as transformers' penalty
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        shared = common_prefix(self._last_prompt, list(ids))
        self._last_prompt = list(ids)
        measured: tuple[int, int] | None = None
        received: list[int] = []
        withheld = ended = False
        last: StrideChunk | None = None
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise ServerError(
                        f"{self.url}/v1/completions answered {response.status_code}: {response.text[:300]}"
                    )
                for chunk in _events(response):
                    if chunk.prompt_tokens is not None and chunk.cached_tokens is not None:
                        measured = (chunk.prompt_tokens, chunk.cached_tokens)
                    if chunk.generated is not None and chunk.generated > len(received) + len(chunk.token_ids):
                        withheld = True  # llama.cpp streams no id for a token that ends inside a UTF-8 character
                        break
                    received += chunk.token_ids
                    if last is not None:  # after the finish: only usage (vLLM's cached count comes last)
                        last.token_ids += chunk.token_ids
                    elif chunk.finish_reason is not None:
                        last = chunk
                    else:
                        yield chunk
                ended = not withheld
                if last is not None:  # the finishing chunk carries what the server served from its cache
                    if measured is not None:
                        last.prompt_tokens, last.cached_tokens = measured
                    yield last
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}/v1/completions failed: {type(exc).__name__}: {exc}") from exc
        finally:
            # a request closed early (a stop string) may end before the server's usage: not a missing metric
            self._account(len(ids), shared, measured, complete=ended)
        if withheld:  # go on from the last id known, without streaming: the answer then lists every id
            yield self._rest([*ids, *received], max_tokens - len(received), body)

    def _rest(self, ids: list[int], max_tokens: int, body: dict[str, Any]) -> StrideChunk:
        """The rest of a stride from llama.cpp's own ``/completion``, which returns all the ids at once."""
        rest = {**body, "prompt": ids, "n_predict": max_tokens, "stream": False, "return_tokens": True}
        rest.pop("max_tokens")
        rest.pop("stream_options")
        try:
            response = self.client.post("/completion", json=rest)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}/completion failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(f"{self.url}/completion answered {response.status_code}: {response.text[:300]}")
        data = response.json()
        cached = (data.get("timings") or {}).get("cache_n")
        self._last_prompt = ids
        self._account(len(ids), 0, (len(ids), cached) if cached is not None else None, complete=True)
        finish = "stop" if data.get("stop_type") in ("eos", "word") else "length"
        return StrideChunk([int(t) for t in data.get("tokens", [])], finish, len(ids), cached)

    def _account(self, sent: int, shared: int, measured: tuple[int, int] | None, complete: bool) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.prompt_tokens += sent
            if measured is None:
                if not complete:
                    return
                self._warn_once(
                    "metrics",
                    f"{self.url} reports no cached prompt tokens (usage.prompt_tokens_details.cached_tokens): "
                    "prefix-cache reuse cannot be measured (vLLM: --enable-prompt-tokens-details).",
                )
                return
            self.stats.cached_tokens += measured[1]
            self.stats.per_request.append((sent, measured[1]))
            if shared >= SHARED_PREFIX_TO_CHECK and measured[1] == 0:
                self._warn_once(
                    "prefix",
                    f"{self.url} served none of the {shared} leading ids this request shares with the previous one "
                    "from its cache: prefix caching looks off, so every retrieval recomputes the whole context "
                    "(vLLM: --enable-prefix-caching; llama.cpp: no --no-cache-prompt, a slot per concurrent call).",
                )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        self.client.close()


def _context_length(entry: dict[str, Any]) -> int | None:
    meta = entry.get("meta") or {}  # llama.cpp: n_ctx is what the server gives a sequence; vLLM: max_model_len
    for value in (entry.get("max_model_len"), meta.get("n_ctx"), meta.get("n_ctx_train")):
        if isinstance(value, int) and value > 0:
            return value
    return None


def _events(response: httpx.Response) -> Iterator[StrideChunk]:
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        data = json.loads(payload)
        if "error" in data:
            raise ServerError(f"the server failed mid-stream: {data['error']}")
        choices = data.get("choices") or [{}]
        choice = choices[0]
        usage = data.get("usage") or {}
        timings = data.get("timings") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is None and "cache_n" in timings:
            cached = timings["cache_n"]
        prompt = usage.get("prompt_tokens")
        if prompt is None and "prompt_n" in timings:
            prompt = timings["prompt_n"] + (timings.get("cache_n") or 0)
        generated = timings.get("predicted_n", usage.get("completion_tokens"))
        yield StrideChunk(_token_ids(choice), choice.get("finish_reason"), prompt, cached, generated)


def _token_ids(choice: dict[str, Any]) -> list[int]:
    """The chunk's generated ids, wherever this server puts them."""
    if isinstance(choice.get("token_ids"), list):  # vLLM, return_token_ids
        return [int(i) for i in choice["token_ids"]]
    logprobs = choice.get("logprobs") or {}
    if isinstance(logprobs.get("content"), list):  # llama.cpp
        return [int(t["id"]) for t in logprobs["content"]]
    tokens = logprobs.get("tokens")
    if isinstance(tokens, list):  # vLLM, return_tokens_as_token_ids
        return [int(str(t).removeprefix("token_id:")) for t in tokens]
    if choice.get("text"):
        raise ServerError(
            "the server streamed text without token ids (neither logprobs ids nor token_ids): FlashBack needs the "
            "ids to lay out the next stride. Use llama.cpp's llama-server, vLLM >= 0.10.2 or SGLang."
        )
    return []
