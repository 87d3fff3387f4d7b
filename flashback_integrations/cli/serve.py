"""``flashback serve``: the OpenAI-compatible server over one model and a Chroma store."""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import FlashBackConfig, LoadSettings
from ..engine.sampling import Sampling
from ..errors import ConfigError
from ..store.chroma import StoreLocation
from .app import app, bench_app, console, fail, load_model, tokenizer_label
from .options import Out, Stem, with_settings

DEFAULT_RETRIEVAL_TIMEOUT = 30.0
"""A served retrieval that takes longer counts as failed (``--on-retrieval-error`` decides what follows), so a
hung store never holds a worker for good; ``--retrieval-timeout`` changes it."""


class Collections:
    """Chroma collections opened on first use and kept; a name the store lacks is None (a 404)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> Any:
        from ..store import ChromaRetriever
        from ..store.chroma import collection_names

        with self._lock:
            if name not in self._open:
                if name not in collection_names(self.client):
                    return None
                self._open[name] = ChromaRetriever(name, client=self.client)
            return self._open[name]


def check_binding(host: str, api_key: str | None) -> None:
    """Loopback needs no key; any other address does (the server runs a model and reads a store)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        raise ConfigError(
            f"--host {host} makes the server reachable from other machines; give --api-key KEY (or set "
            "FLASHBACK_API_KEY) so only clients with the key are served, or bind 127.0.0.1."
        )


@app.command()
@with_settings(load=LoadSettings, config=FlashBackConfig, sampling=Sampling, store=StoreLocation)
def serve(
    collection: Annotated[
        str | None, typer.Option(help="Default collection (a request may name another in its flashback field).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; not loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="FLASHBACK_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The id clients pass as model (default: --model).")
    ] = None,
    parallel: Annotated[int, typer.Option(help="Generations at once (worker threads).")] = 1,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a worker; more get 429.")] = 32,
    max_tokens: Annotated[int, typer.Option(help="max_tokens when a request gives none.")] = 256,
    *,
    load: LoadSettings,
    config: FlashBackConfig,
    sampling: Sampling,
    store: StoreLocation,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics (OpenAI's API), retrieving
    every --stride tokens from --collection while answering."""
    try:
        import uvicorn

        from ..serve import ServeSettings, create_app
    except ImportError as exc:
        raise ConfigError(
            f"flashback serve needs the serve extra ({exc.name} is missing): "
            "pip install 'flashback-integrations[serve]'."
        ) from exc
    check_binding(host, api_key)
    if parallel < 1 or max_queue < 0 or max_tokens < 1:
        raise ConfigError("--parallel and --max-tokens must be >= 1 and --max-queue >= 0.")
    if config.retrieval_timeout is None:
        config = config.replace(retrieval_timeout=DEFAULT_RETRIEVAL_TIMEOUT)
    client = store.connect()
    collections = Collections(client)
    if collection is not None and collections(collection) is None:
        from ..store.chroma import get_collection

        get_collection(client, collection)  # raises with the names there are
    fb = load_model(load, config.mode)
    settings = ServeSettings(
        model_name=served_model_name or load.model, api_key=api_key, parallel=parallel, max_queue=max_queue,
        max_tokens=max_tokens,
    )  # fmt: skip
    application = create_app(
        fb, settings, config=config, sampling=sampling, retrievers=collections, default_collection=collection
    )
    mode = fb.resolve_config(config).mode
    console.print(
        f"[bold]FlashBack[/] serving {settings.model_name!r} (mode {mode}, {fb.backend.name} backend) at "
        f"http://{host}:{port}/v1" + (f", collection {collection!r}" if collection else ", no default collection")
    )
    log_level = "info" if os.environ.get("FLASHBACK_SERVE_ACCESS_LOG") else "warning"
    uvicorn.run(application, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)


@bench_app.command("serve")
def bench_serve(
    levels: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="Requests per level.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer (EOS ignored).")] = 32,
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens.")] = 16,
    parallel: Annotated[int, typer.Option(help="flashback serve's workers.")] = 1,
    llama_server: Annotated[
        bool, typer.Option("--llama-server/--no-llama-server", help="Also llama-server on the same GGUF.")
    ] = True,
    slots: Annotated[int, typer.Option(help="llama-server's slots (-np).")] = 4,
    out: Out = Path("benchmarks/results"),
    stem: Stem = "serve_cpu",
) -> None:
    """Load on flashback serve (the default model, isolated, the sample collection) and llama-server (JSON + PNG)."""
    import contextlib
    import json

    from ..bench.serve import chat_body, plot, run_rows, stuffed_body
    from ..bench.servers import llama_server as start_llama_server
    from ..data import sample_corpus_dir
    from ..serve import ServeSettings, create_app, serve_in_thread
    from ..store import ChromaRetriever, Embedder, connect, ingest
    from .generate import SAMPLE_COLLECTION

    try:
        counts = [int(x) for x in levels.split(",")]
        if min(counts) < 1 or requests < 1 or max_tokens < 2:
            raise ValueError
    except ValueError as exc:
        raise fail(
            ValueError("--levels takes positive integers (1,4,16); --requests >= 1, --max-tokens >= 2.")
        ) from exc
    load = LoadSettings()
    fb = load_model(load)
    client = connect(None)
    ingest(client, SAMPLE_COLLECTION, [sample_corpus_dir()], fb.tokenizer, tokenizer_label(load.model), Embedder(),
           chunk_tokens=64, progress=False)  # fmt: skip
    retriever = ChromaRetriever(SAMPLE_COLLECTION, client=client)
    config = FlashBackConfig(stride=stride, query_tokens=32, num_passages=1, max_doc_tokens=128, retrieval_timeout=30)
    settings = ServeSettings(model_name="default", parallel=parallel, max_queue=max(counts) + 4)
    app = create_app(fb, settings, config=config, retrievers={SAMPLE_COLLECTION: retriever},
                     default_collection=SAMPLE_COLLECTION)  # fmt: skip
    mode = fb.resolve_config(config).mode
    gguf = getattr(fb.backend, "model_path", None)

    def report(label: str, r: dict[str, Any]) -> None:
        hit = r["passage_cache_hit_rate"]
        console.print(
            f"{label:<28} c={r['concurrency']:>2}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {r['ttft_p50_s']:.3f} s p95 {r['ttft_p95_s']:.3f} s, TPOT p50 {r['tpot_p50_s'] * 1000:.1f} ms"
            + (f", passage cache hits {hit:.0%}" if hit is not None else "")
        )

    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(serve_in_thread(app))
        rows = [
            (f"flashback {mode} ({fb.backend.name})", ours, chat_body("default", max_tokens)),
            (f"flashback none ({fb.backend.name})", ours, chat_body("default", max_tokens, flashback={"mode": "none"})),
        ]
        if llama_server and gguf is not None:
            theirs = stack.enter_context(start_llama_server(gguf, slots=slots, n_ctx=2048 * slots))
            rows += [
                ("llama-server plain", theirs, chat_body("flashback", max_tokens)),
                ("llama-server stuffed top-1", theirs, stuffed_body("flashback", max_tokens, retriever)),
            ]
        results = run_rows(rows, counts, requests, report)
    options = {"levels": levels, "requests": requests, "max_tokens": max_tokens, "stride": stride,
               "parallel": parallel, "slots": slots, "stem": stem}  # fmt: skip
    summary = {
        "command": "flashback bench serve " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items()),
        "model": fb.name, "mode": mode, "backend": fb.backend.name, "gguf": str(gguf) if gguf else None,
        "results": results,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(results, out / f"{stem}.png", f"{load.model} ({mode}): {max_tokens}-token answers, stride {stride}")
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
