"""The ``flashback`` command line: ``generate`` for one prompt, ``demo`` for the README's main job."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import FlashBackConfig
from .errors import FlashBackError
from .events import FinishEvent, Retrieval, RetrievalEvent, TokenEvent
from .samples import sample_corpus_dir

app = typer.Typer(help="FlashBack: retrieval-augmented generation with KV-cache reuse.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)
PersistDir = Annotated[
    Path | None,
    typer.Option("--persist-dir", help="Embedded store folder (default: $FLASHBACK_HOME/chroma)."),
]
ChromaHost = Annotated[str | None, typer.Option("--chroma-host", help="Use a Chroma server at this host.")]
ChromaPort = Annotated[int, typer.Option("--chroma-port", help="Chroma server port.")]


def _passage_label(p) -> str:
    if "source_name" in p.metadata:
        return f"{p.metadata['source_name']}#{p.metadata.get('chunk_index', '?')}"
    return Path(p.id).name if p.id else "?"


def _print_retrieval(r: Retrieval) -> None:
    if r.error:
        console.print(f"[yellow]  retrieval @ token {r.step} skipped:[/] {escape(r.error)}")
        return
    ids = escape(", ".join(_passage_label(p) for p in r.passages) or "none")
    console.print(
        f"[cyan]  retrieval @ token {r.step}[/] query={escape(repr(r.query[-60:]))} -> {ids}: "
        f"block={r.block_tokens} tok, kept {r.reused_tokens} cached, recomputed {r.prefill_tokens}, "
        f"{r.latency_s * 1000:.1f} ms"
    )


def _load(model: str, adapter: str | None):
    from .model import FlashBackModel

    with console.status(f"Loading {model}{' + ' + adapter if adapter else ''} ..."):
        started = time.perf_counter()
        fb = FlashBackModel.from_pretrained(model, adapter=adapter)
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
    mode: Annotated[str, typer.Option(help="append | prepend | none")] = "append",
    stride: Annotated[int, typer.Option(help="Retrieve every N generated tokens.")] = 16,
    query_tokens: Annotated[int, typer.Option(help="Query = text of the last N tokens.")] = 32,
    top_k: Annotated[int, typer.Option(help="Passages per retrieval.")] = 1,
    max_doc_tokens: Annotated[int, typer.Option(help="Tokens kept of each passage.")] = 128,
    marks: Annotated[bool | None, typer.Option("--marks/--no-marks", help="Marking tokens (default: auto).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    on_retrieval_error: Annotated[str, typer.Option(help="raise | skip")] = "raise",
    collection: Annotated[str | None, typer.Option(help="Retrieve from this Chroma collection instead.")] = None,
    persist_dir: PersistDir = None,
    chroma_host: ChromaHost = None,
    chroma_port: ChromaPort = 8000,
) -> None:
    """Continue PROMPT, retrieving every --stride tokens from --collection (Chroma) or --corpus (BM25)."""
    from .retrieval import BM25Retriever
    from .store import ChromaRetriever

    try:
        config = FlashBackConfig(
            mode=mode,
            stride=stride,
            query_tokens=query_tokens,
            top_k=top_k,  # type: ignore[arg-type]
            max_doc_tokens=max_doc_tokens,
            marks=marks,
            on_retrieval_error=on_retrieval_error,
        )  # type: ignore[arg-type]
        retriever = None
        if config.retrieves and collection is not None:
            retriever = ChromaRetriever(collection, client=_client(persist_dir, chroma_host, chroma_port))
        elif config.retrieves:
            retriever = BM25Retriever.from_files(corpus or [sample_corpus_dir()], chunk_words=80)
        fb = _load(model, adapter)
        events = fb.stream(
            prompt,
            retriever,
            config=config,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
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
) -> None:
    """Answer questions with retrieval over the bundled corpus, then time the three modes."""
    from .store import ChromaRetriever, Embedder, connect, ingest

    corpus = sample_corpus_dir()
    fb = _load(model, adapter)
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
    base = FlashBackConfig(stride=stride, query_tokens=32, top_k=1, max_doc_tokens=128)
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
    for mode in ("append", "prepend", "none"):
        seconds, forwarded = 0.0, 0
        for question, prompt in zip(DEMO_QUESTIONS, prompts, strict=True):
            result = fb.generate(
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
        "input's cache at every retrieval.[/]"
    )
    if fb.mark_ids is None:
        console.print(
            "[dim]This model has no marking tokens (no FlashBack adapter yet): append runs without "
            "marks, which an untrained model reads poorly.[/]"
        )


index_app = typer.Typer(
    help="Build and inspect Chroma collections (embedded or a Chroma server).", no_args_is_help=True
)
app.add_typer(index_app, name="index")


def _client(persist_dir: Path | None, host: str | None, port: int):
    from .store import connect

    return connect(persist_dir, host, port)


def load_tokenizer(name: str):
    """The reader model's tokenizer, used to size chunks in the reader's own tokens."""
    from transformers import AutoTokenizer

    from .resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))


def _tokenizer_label(name: str) -> str:
    from .resolve import DEFAULT_MODEL_ID

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
        client = _client(persist_dir, chroma_host, chroma_port)
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


@bench_app.command("speed")
def bench_speed(
    model: Annotated[
        str,
        typer.Option(
            help="'default', a hub id/path, or config:NAME (random weights: llama-1b, llama-7b, opt-125m, opt-6.7b)."
        ),
    ] = "default",
    lengths: Annotated[str, typer.Option(help="Comma-separated total lengths T.")] = "512,1024,2048",
    modes: Annotated[str, typer.Option(help="Comma-separated modes.")] = "prepend,append,none",
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens.")] = 16,
    doc_tokens: Annotated[int, typer.Option(help="Tokens of each random passage.")] = 128,
    prompt_tokens: Annotated[int | None, typer.Option(help="Prompt length (default: min(512, T/4)).")] = None,
    gen_tokens: Annotated[int | None, typer.Option(help="Generated tokens (default: T - prompt - doc).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point (median reported).")] = 3,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("benchmarks/results"),
    stem: Annotated[str, typer.Option(help="Output file name stem.")] = "speed_cpu",
) -> None:
    """Wall-clock time of prepend vs append vs plain decoding as the sequence grows (JSON + PNG)."""
    import json

    from rich.progress import Progress

    from .bench.speed import SpeedCase, plan_lengths, plot, run_in_subprocess, summarise

    cases = []
    try:
        for total in (int(t) for t in lengths.split(",")):
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
                    )
                )
    except ValueError as exc:
        raise _fail(exc) from exc
    results = []
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.mode} T={case.total_tokens}")
            results.append(run_in_subprocess(case))
            progress.advance(task)
    summary = summarise(results)
    summary["command"] = "flashback bench speed " + " ".join(
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
            "dtype": dtype,
            "device": device,
        }.items()
        if v is not None
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / f"{stem}.png", f"{model} {dtype} on {device}: stride {stride}, doc {doc_tokens}")
    table = Table(title=f"{model}, {dtype}, {device}")
    for column in ("T", "mode", "median s", "ms/token", "tokens through model", "peak MB"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["total_tokens"]),
            r["mode"],
            f"{r['median_s']:.2f}",
            f"{r['ms_per_token']:.1f}",
            str(r["forward_tokens"]),
            f"{r['peak_memory_mb']:.0f}",
        )
    console.print(table)
    for total, row in summary["speedups"].items():
        console.print(f"T={total}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m flashback_integrations.cli` where no venv exists
    app()
