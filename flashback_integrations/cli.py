"""The ``flashback`` command line: ``generate`` for one prompt, ``demo`` for the README's main job."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import FlashBackConfig
from .errors import FlashBackError
from .events import FinishEvent, Retrieval, RetrievalEvent, TokenEvent

app = typer.Typer(help="FlashBack: retrieval-augmented generation with KV-cache reuse.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def sample_corpus_dir() -> Path:
    """The small bundled corpus (Python standard library notes) that the demo retrieves from."""
    return Path(str(resources.files("flashback_integrations") / "data" / "sample_corpus"))


def _print_retrieval(r: Retrieval) -> None:
    if r.error:
        console.print(f"[yellow]  retrieval @ token {r.step} skipped:[/] {escape(r.error)}")
        return
    ids = escape(", ".join(Path(p.id).name if p.id else "?" for p in r.passages) or "none")
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
        f"[dim]loaded {fb.name} in {time.perf_counter() - started:.1f}s; marks available: "
        f"{fb.mark_ids is not None}[/]"
    )
    return fb


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    corpus: Annotated[
        list[Path] | None, typer.Option("--corpus", "-c", help="Text files/folders for BM25.")
    ] = None,
    model: Annotated[str, typer.Option(help="'default', a hub id or a local path.")] = "default",
    adapter: Annotated[str | None, typer.Option(help="FlashBack adapter directory.")] = None,
    mode: Annotated[str, typer.Option(help="append | prepend | none")] = "append",
    stride: Annotated[int, typer.Option(help="Retrieve every N generated tokens.")] = 16,
    query_tokens: Annotated[int, typer.Option(help="Query = text of the last N tokens.")] = 32,
    top_k: Annotated[int, typer.Option(help="Passages per retrieval.")] = 1,
    max_doc_tokens: Annotated[int, typer.Option(help="Tokens kept of each passage.")] = 128,
    marks: Annotated[
        bool | None, typer.Option("--marks/--no-marks", help="Marking tokens (default: auto).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    on_retrieval_error: Annotated[str, typer.Option(help="raise | skip")] = "raise",
) -> None:
    """Continue PROMPT, retrieving from --corpus (BM25) every --stride tokens, streaming the text."""
    from .retrieval import BM25Retriever

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
        if config.retrieves:
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
) -> None:
    """Answer questions with retrieval over the bundled corpus, then time the three modes."""
    from .retrieval import BM25Retriever

    corpus = sample_corpus_dir()
    retriever = BM25Retriever.from_files([corpus], chunk_words=60)
    console.print(f"[dim]BM25 over {len(retriever.texts)} chunks of {escape(str(corpus))}[/]")
    fb = _load(model, adapter)
    base = FlashBackConfig(stride=stride, query_tokens=32, top_k=1, max_doc_tokens=128)
    prompts = [fb.chat_ids([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
    fb.generate(prompts[0], max_new_tokens=2, config=base.replace(mode="none"))  # warm-up
    for question, prompt in zip(DEMO_QUESTIONS, prompts, strict=True):
        console.rule()
        console.print(f"[bold]Q: {escape(question)}[/]")
        result = fb.generate(
            prompt, retriever, config=base, max_new_tokens=max_new_tokens, first_query=question
        )
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


def main() -> None:  # pragma: no cover
    app()
