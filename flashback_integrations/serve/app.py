"""The FastAPI app behind ``flashback serve``: OpenAI's chat and completions endpoints over one loaded
model, retrieving during generation from named collections.

Bad input is a 4xx with OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``), never a
traceback; an unexpected failure is a 500 with one line and the server keeps serving. Requests beyond the
workers and the waiting room get 429 with ``Retry-After``; a client that disconnects stops its generation."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..config import FlashBackConfig
from ..engine.sampling import Sampling
from ..errors import ConfigError, ContextWindowError, FlashBackError, RetrievalError
from ..events import FinishEvent, GenerationResult, RetrievalEvent, TokenEvent
from .formats import Reply
from .jobs import Job, QueueFull, Scheduler
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, flashback_options

logger = logging.getLogger("flashback_integrations.serve")


@dataclass
class ServeSettings:
    """How the server admits and answers requests (the model and store are given to :func:`create_app`)."""

    model_name: str = "default"
    """The id clients name in ``model`` and ``/v1/models`` lists."""
    api_key: str | None = None
    parallel: int = 1
    """Generations at once (each a worker thread; on two cores one is usually fastest per request)."""
    max_queue: int = 32
    """Requests that may wait for a worker; one more is answered 429."""
    max_tokens: int = 256
    """``max_tokens`` when a request gives none."""
    max_body_bytes: int = 4 * 2**20
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = extra.get("param"), extra.get("code")
        self.headers: dict[str, str] | None = extra.get("headers")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


RetrieverSource = Mapping[str, Any] | Callable[[str], Any]


class FlashBackServer:
    """The model, the defaults every request starts from, the collections and the workers."""

    def __init__(
        self,
        fb: Any,
        settings: ServeSettings,
        config: FlashBackConfig | None = None,
        sampling: Sampling | None = None,
        retrievers: RetrieverSource | None = None,
        default_collection: str | None = None,
    ) -> None:
        self.fb, self.settings = fb, settings
        self.config = config or FlashBackConfig()
        self.sampling = sampling or Sampling()
        self.retrievers = retrievers or {}
        self.default_collection = default_collection
        self.scheduler = Scheduler(settings.parallel, settings.max_queue)
        self.metrics = Metrics(self.scheduler)

    # ----------------------------------------------------------------- requests
    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key (Authorization: Bearer KEY).", code="invalid_api_key")

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        self.check_key(request)
        body = await request.body()
        if len(body) > self.settings.max_body_bytes:
            raise APIError(413, f"request body over {self.settings.max_body_bytes} bytes.", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The body is not valid JSON ({exc}).", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise APIError(400, "The body must be a JSON object.", code="invalid_json")
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise APIError(400, f"{param}: {message}.", param=param, code=first["type"]) from exc
        if parsed.model != self.settings.model_name:
            raise APIError(
                404,
                f"The model {parsed.model!r} does not exist here; this server serves {self.settings.model_name!r}.",
                param="model",
                code="model_not_found",
            )
        try:
            parsed.unsupported()
        except ConfigError as exc:
            raise APIError(400, str(exc), code="unsupported_parameter") from exc
        return parsed

    def retriever(self, name: str) -> Any:
        source = self.retrievers
        found = source(name) if callable(source) else source.get(name)
        if found is None:
            raise APIError(
                404,
                f"No collection named {name!r} on this server.",
                param="flashback.collection",
                code="collection_not_found",
            )
        return found

    def engine_kwargs(self, req: Any, max_tokens: int | None) -> tuple[Any, dict[str, Any]]:
        """(retriever, engine keyword arguments) for a request: the server's defaults, then its fields."""
        collection, changes = flashback_options(req.flashback)
        config = self.config.replace(**changes) if changes else self.config
        collection = collection or self.default_collection
        retriever = self.retriever(collection) if collection is not None else None
        if retriever is None:
            if changes.get("mode") not in (None, "none") or config.question_passages:
                raise ConfigError(
                    "this request retrieves (mode or question_passages), and this server has no default "
                    "collection; name one in flashback.collection."
                )
            config = config.replace(mode="none")
        defaults = self.sampling
        sampling = Sampling(
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k if req.top_k is None else req.top_k,
            min_p=defaults.min_p if req.min_p is None else req.min_p,
            repetition_penalty=defaults.repetition_penalty
            if req.repetition_penalty is None
            else req.repetition_penalty,
            seed=defaults.seed if req.seed is None else req.seed,
        )
        kwargs = {
            "config": config,
            "max_new_tokens": max_tokens or self.settings.max_tokens,
            "stop": req.stops(),
            "ignore_eos": bool(req.ignore_eos),
            **vars(sampling),
        }
        return retriever, kwargs

    def prepare_chat(self, req: ChatRequest) -> tuple[Any, Reply]:
        from ..chat import merge_turns, prepare_chat, reporting_question
        from ..tools import response_format_grammar

        retriever, kwargs = self.engine_kwargs(req, req.limit())
        grammar = response_format_grammar(req.response_format) if req.response_format is not None else None
        call = prepare_chat(
            self.fb, merge_turns(req.chat_messages()), tools=req.tools, tool_choice=req.tool_choice,
            parallel_tool_calls=bool(req.parallel_tool_calls), response_grammar=grammar, retriever=retriever,
            config=kwargs["config"],
        )  # fmt: skip
        kwargs["config"] = kwargs["config"].replace(question_passages=0)  # in the prompt now
        if req.logprobs or req.top_logprobs:
            kwargs["logprobs"], kwargs["top_logprobs"] = bool(req.logprobs), req.top_logprobs or 0
        events = self.fb.stream(
            call.prompt_ids, retriever, grammar=call.grammar, first_query=call.first_query, **kwargs
        )  # validates here, before a worker is taken
        events = reporting_question(events, call.question)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return events, Reply("chat", self.settings.model_name, self.fb.tokenizer, call.tools, include)

    def prepare_completion(self, req: CompletionRequest) -> tuple[Any, Reply]:
        retriever, kwargs = self.engine_kwargs(req, req.max_tokens)
        if req.logprobs is not None:
            kwargs["logprobs"], kwargs["top_logprobs"] = True, req.logprobs
        events = self.fb.stream(req.single_prompt(), retriever, **kwargs)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return events, Reply("completion", self.settings.model_name, self.fb.tokenizer, None, include)

    # ----------------------------------------------------------------- answering
    async def answer(self, request: Request, req: Any, prepare: Callable[[Any], tuple[Any, Reply]]) -> Response:
        try:
            events, reply = await asyncio.to_thread(prepare, req)
        except ContextWindowError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from exc
        except RetrievalError as exc:  # the question's passages (question_passages), retrieved while preparing
            raise APIError(502, str(exc), "retrieval_error", code="retrieval_failed") from exc
        except (ConfigError, ValueError, TypeError) as exc:
            raise APIError(400, str(exc)) from exc
        job = Job(lambda: events)
        started = time.perf_counter()
        try:
            self.scheduler.submit(job)
        except QueueFull:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            retry = str(self.settings.retry_after_s)
            raise APIError(
                429,
                f"Every worker is busy and {self.settings.max_queue} requests are waiting; retry later.",
                "rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": retry},
            ) from None
        if req.stream:
            return StreamingResponse(self.stream(job, reply, started), media_type="text/event-stream")
        return JSONResponse(await self.collect(request, job, reply, started))

    def _finished(self, result: GenerationResult, first: float | None, started: float) -> None:
        now = time.perf_counter()
        self.metrics.finished(result, None if first is None else first - started, now - started)

    async def collect(self, request: Request, job: Job, reply: Reply, started: float) -> dict[str, Any]:
        first: float | None = None
        result: GenerationResult | None = None
        watch = asyncio.create_task(_watch_disconnect(request, job))
        try:
            async for event in job.events():
                if isinstance(event, TokenEvent) and first is None:
                    first = time.perf_counter()
                elif isinstance(event, FinishEvent):
                    result = event.result
        except RetrievalError as exc:
            raise APIError(502, str(exc), "retrieval_error", code="retrieval_failed") from exc
        except FlashBackError as exc:
            raise APIError(400, str(exc)) from exc
        finally:
            watch.cancel()
        if result is None:  # cancelled: the client is gone, nobody reads this
            self.metrics.cancelled.inc()
            raise APIError(499, "The client closed the request.", code="client_closed")
        self._finished(result, first, started)
        return reply.body(result)

    async def stream(self, job: Job, reply: Reply, started: float) -> AsyncIterator[bytes]:
        first: float | None = None
        ended = False  # finished or failed: anything else means the client went away
        try:
            for chunk in reply.opening():
                yield chunk
            async for event in job.events():
                if isinstance(event, TokenEvent):
                    first = first or time.perf_counter()
                    for chunk in reply.token(event.text, event.logprob):
                        yield chunk
                elif isinstance(event, RetrievalEvent):
                    yield reply.retrieval(event.retrieval)
                elif isinstance(event, FinishEvent):
                    ended = True
                    self._finished(event.result, first, started)
                    for chunk in reply.closing(event.result):
                        yield chunk
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            ended = True
            kind = "retrieval_error" if isinstance(exc, RetrievalError) else "server_error"
            if not isinstance(exc, FlashBackError):
                logger.exception("generation failed")
            error = {"message": str(exc) or type(exc).__name__, "type": kind, "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n".encode()
        finally:
            if not ended:
                job.cancelled.set()  # the worker stops at its next token and frees the slot
                self.metrics.cancelled.inc()


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job once its (non-streaming) client is gone."""
    with contextlib.suppress(asyncio.CancelledError):
        while not job.cancelled.is_set():
            if await request.is_disconnected():
                job.cancelled.set()
                return
            await asyncio.sleep(0.25)


def create_app(
    fb: Any,
    settings: ServeSettings | None = None,
    *,
    config: FlashBackConfig | None = None,
    sampling: Sampling | None = None,
    retrievers: RetrieverSource | None = None,
    default_collection: str | None = None,
) -> FastAPI:
    """The server's app over a loaded ``FlashBackModel``. ``retrievers`` maps a collection name to a
    retriever (or is a function of the name returning one, None when there is none)."""
    server = FlashBackServer(fb, settings or ServeSettings(), config, sampling, retrievers, default_collection)
    app = FastAPI(title="FlashBack", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        server.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        server.metrics.requests.labels(request.url.path, "500").inc()
        body = {
            "error": {
                "message": f"internal error: {type(exc).__name__}: {exc}"[:500],
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=500)

    def generation(kind: type[BaseModel], prepare: Callable[[Any], tuple[Any, Reply]]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            req = await server.parse(request, kind)
            response = await server.answer(request, req, prepare)
            server.metrics.requests.labels(request.url.path, "200").inc()
            return response

        return endpoint

    app.add_api_route("/v1/chat/completions", generation(ChatRequest, server.prepare_chat), methods=["POST"])
    app.add_api_route("/v1/completions", generation(CompletionRequest, server.prepare_completion), methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_key(request)
        card = {"id": server.settings.model_name, "object": "model", "created": 0, "owned_by": "flashback"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server.scheduler
        return {"status": "ok", "running": s.running, "waiting": s.waiting}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        server.check_key(request)
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    return app
