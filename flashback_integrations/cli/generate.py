"""``flashback generate`` (one prompt) and ``flashback demo`` (the README's main job)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..chat import prepare_chat
from ..config import FlashBackConfig, LoadSettings
from ..data import sample_corpus_dir
from ..engine.sampling import Sampling
from ..events import FinishEvent, Retrieval, RetrievalEvent, TokenEvent
from ..store.chroma import StoreLocation
from .app import app, console, load_model, print_retrieval, tokenizer_label
from .options import MaxNewTokens, with_settings


@app.command()
@with_settings(load=LoadSettings, config=FlashBackConfig, sampling=Sampling, store=StoreLocation)
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    corpus: Annotated[list[Path] | None, typer.Option("--corpus", "-c", help="Text files/folders for BM25.")] = None,
    collection: Annotated[str | None, typer.Option(help="Retrieve from this Chroma collection instead.")] = None,
    max_new_tokens: MaxNewTokens = 64,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Answer PROMPT as a question (the model's chat template) instead of continuing it."
        ),
    ] = False,
    *,
    load: LoadSettings,
    config: FlashBackConfig,
    sampling: Sampling,
    store: StoreLocation,
) -> None:
    """Continue PROMPT (or answer it, --chat), retrieving every --stride tokens from --collection (Chroma) or
    --corpus (BM25)."""
    from ..loading.shipped import default_mode_for
    from ..retrieval import BM25Retriever
    from ..store import ChromaRetriever

    config = config.replace(mode=config.mode or default_mode_for(load.model, load.adapter))
    retriever = None
    if (config.retrieves or config.question_passages) and collection is not None:
        retriever = ChromaRetriever(collection, client=store.connect())
    elif config.retrieves or config.question_passages:
        retriever = BM25Retriever.from_files(corpus or [sample_corpus_dir()], chunk_words=80)
    fb = load_model(load, config.mode)
    asked = None
    if chat:  # the question's passages (--question-passages) go into the user turn, as a stuff chain does
        call = prepare_chat(fb, [{"role": "user", "content": prompt}], retriever=retriever, config=config)
        text, asked, config = call.prompt_ids, call.question, config.replace(question_passages=0)
    events = fb.stream(
        text if chat else prompt, retriever, config=config, max_new_tokens=max_new_tokens, stop=stop,
        first_query=prompt if chat else None, **vars(sampling),
    )  # fmt: skip
    console.print(f"[bold]{escape(prompt)}[/]", end="\n" if chat else "")
    pending: list[Retrieval] = []
    for event in events:
        if isinstance(event, RetrievalEvent):
            pending.append(event.retrieval)
        elif isinstance(event, TokenEvent):
            console.print(event.text, end="", markup=False, highlight=False)
        elif isinstance(event, FinishEvent):
            result = event.result
    console.print()
    question = asked or result.question
    if question is not None:
        console.print("[dim]  passages for the question, in the prompt:[/]")
        print_retrieval(question)
    for r in pending:
        print_retrieval(r)
    console.print(
        f"[dim]{result.completion_tokens} tokens in {result.elapsed_s:.2f}s "
        f"({result.finish_reason}); {result.forward_tokens} tokens through the model[/]"
    )


SAMPLE_COLLECTION = "flashback-sample"
DEMO_QUESTIONS = (
    "How do I pretty-print JSON with the json module?",
    "How do I serve the files of a folder over HTTP from Python?",
    "How do I run two coroutines at the same time with asyncio?",
)


@app.command()
@with_settings(load=LoadSettings)
def demo(
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 64,
    stride: Annotated[int, typer.Option(help="Retrieve every N tokens.")] = 16,
    persist_dir: Annotated[
        Path | None, typer.Option(help="Embedded store folder (default: $FLASHBACK_HOME/chroma).")
    ] = None,
    *,
    load: LoadSettings,
) -> None:
    """Answer questions with retrieval over the bundled corpus, then time each mode."""
    from ..loading.shipped import default_mode_for
    from ..store import ChromaRetriever, Embedder, connect, default_persist_dir, ingest

    corpus = sample_corpus_dir()
    first = default_mode_for(load.model, load.adapter)
    fb = load_model(load, first)
    client = connect(persist_dir)
    report = ingest(
        client, SAMPLE_COLLECTION, [corpus], fb.tokenizer, tokenizer_label(load.model), Embedder(), chunk_tokens=64,
        progress=False,
    )  # fmt: skip
    retriever = ChromaRetriever(SAMPLE_COLLECTION, client=client)
    console.print(
        f"[dim]Chroma collection {SAMPLE_COLLECTION!r} at {escape(str(persist_dir or default_persist_dir()))}: "
        f"{report.chunks_total} chunks of {escape(str(corpus))} ({report.chunks_added} added now)[/]"
    )
    base = FlashBackConfig(mode=first, stride=stride, query_tokens=32, num_passages=1, max_doc_tokens=128)
    first = fb.resolve_config(base).mode
    base = base.replace(mode=first)
    activated = " (activated adapter: the base model until the passage)" if fb.backend.activated else ""
    console.print(f"[dim]mode {first}{activated}, {fb.backend.name} backend[/]")
    prompts = [fb.chat_ids([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
    fb.generate(prompts[0], max_new_tokens=2, config=base.replace(mode="none"))  # warm-up
    for question, prompt in zip(DEMO_QUESTIONS, prompts, strict=True):
        console.rule()
        console.print(f"[bold]Q: {escape(question)}[/]")
        result = fb.generate(prompt, retriever, config=base, max_new_tokens=max_new_tokens, first_query=question)
        console.print(f"[green]A: {escape(result.text.strip())}[/]", highlight=False)
        for r in result.retrievals:
            print_retrieval(r)
    console.rule()
    table = Table(
        title=f"Each mode generates {max_new_tokens} tokens for each of the {len(prompts)} questions "
        f"(EOS ignored), stride {stride}"
    )
    for column in ("mode", "seconds", "ms / token", "tokens through the model"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    modes = ("append", "prepend", "none")
    if fb.backend.places_positions:
        modes = ("isolated", *modes)
    own_adapter = load.adapter is None and load.model == "default"
    runs = [(mode, fb.backend.name) for mode in modes]
    if fb.backend.name == "llamacpp" and own_adapter:  # side by side: the same default on the reference backend
        runs = [("isolated", "llamacpp"), ("isolated", "torch"), ("none", "llamacpp"), ("none", "torch")]
    for mode, backend in runs:
        seconds, forwarded = 0.0, 0
        here = dataclasses.replace(load, backend=backend) if backend != fb.backend.name else load
        fb_mode = load_model(here, mode) if own_adapter else fb
        if fb_mode.backend.activated and mode in ("append", "prepend"):
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
        label = mode if len({b for _, b in runs}) == 1 else f"{mode} ({backend})"
        table.add_row(label, f"{seconds:.2f}", f"{1000 * seconds / tokens:.1f}", str(forwarded))
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
