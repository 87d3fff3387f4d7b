"""``flashback chat``: a conversation in the terminal, streamed, retrieving while it answers.

Commands: ``/reset`` (forget the conversation), ``/mode [NAME]`` (show or change the layout), ``/help``, ``/exit``.
Ctrl-C while it answers stops that answer (what was written stays in the history); at the prompt it clears the
line; Ctrl-D or ``/exit`` leaves. A conversation that outgrows the context is refused with a hint to ``/reset``,
and the history is left as it was."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..config import MODES, FlashBackConfig, LoadSettings
from ..engine.sampling import Sampling
from ..errors import FlashBackError
from ..events import Retrieval, RetrievalEvent, TokenEvent
from ..store.chroma import StoreLocation
from .app import app, console, load_model, print_retrieval
from .options import MaxNewTokens, with_settings

HELP = "/reset forgets the conversation, /mode [NAME] shows or sets the layout, /exit leaves (or Ctrl-D)."


def _retriever(collection: str | None, corpus: list[Path] | None, store: StoreLocation) -> Any:
    from ..data import sample_corpus_dir
    from ..retrieval import BM25Retriever
    from ..store import ChromaRetriever

    if collection is not None:
        return ChromaRetriever(collection, client=store.connect())
    return BM25Retriever.from_files(corpus or [sample_corpus_dir()], chunk_words=80)


def _answer(fb: Any, history: list[dict[str, str]], retriever: Any, config: FlashBackConfig, options: dict) -> str:
    """Stream one answer. Ctrl-C sets a flag (never an exception inside the engine) and the answer stops at the
    next token, keeping what was written."""
    from ..chat import prepare_chat

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    text, retrievals, events = [], [], None
    try:
        call = prepare_chat(fb, history, retriever=retriever, config=config)
        events = fb.stream(call.prompt_ids, retriever, config=config.replace(question_passages=0),
                           first_query=call.first_query, **options)  # fmt: skip
        for event in events:
            if stop.is_set():
                break
            if isinstance(event, TokenEvent):
                text.append(event.text)
                console.print(event.text, end="", markup=False, highlight=False)
            elif isinstance(event, RetrievalEvent):
                retrievals.append(event.retrieval)
    finally:
        signal.signal(signal.SIGINT, previous)
        if events is not None:
            events.close()
    console.print(" [dim](stopped)[/]" if stop.is_set() else "")
    shown: list[Retrieval] = [call.question] if call.question is not None else []
    for r in shown + retrievals:
        print_retrieval(r)
    return "".join(text)


@app.command()
@with_settings(load=LoadSettings, config=FlashBackConfig, sampling=Sampling, store=StoreLocation)
def chat(
    collection: Annotated[str | None, typer.Option(help="Retrieve from this Chroma collection.")] = None,
    corpus: Annotated[
        list[Path] | None, typer.Option("--corpus", "-c", help="Text files/folders for BM25 (default: the sample).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation with.")] = None,
    max_new_tokens: MaxNewTokens = 256,
    *,
    load: LoadSettings,
    config: FlashBackConfig,
    sampling: Sampling,
    store: StoreLocation,
) -> None:
    """Chat with the model in the terminal, retrieving every --stride tokens while it answers."""
    from ..loading.shipped import default_mode_for

    config = config.replace(mode=config.mode or default_mode_for(load.model, load.adapter))
    retriever = _retriever(collection, corpus, store)
    fb = load_model(load, config.mode)
    config = fb.resolve_config(config)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    options = {"max_new_tokens": max_new_tokens, **vars(sampling)}
    console.print(f"[dim]{escape(fb.name)}, mode {config.mode}, {fb.backend.name} backend. {HELP}[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /exit to leave)[/]")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/help":
            console.print(f"[dim]{HELP}[/]")
        elif line == "/reset":
            history = list(start)
            console.print("[dim]conversation cleared[/]")
        elif line.split()[0] == "/mode":
            parts = line.split()
            if len(parts) == 2 and parts[1] in MODES:
                config = config.replace(mode=parts[1])
            elif len(parts) != 1:
                console.print(f"[red]/mode takes one of {', '.join(MODES)}[/]")
            console.print(f"[dim]mode {config.mode}[/]")
        elif line.startswith("/"):
            console.print(f"[red]unknown command {escape(line.split()[0])}[/]. {HELP}")
        else:
            console.print("[bold cyan]bot>[/] ", end="")
            try:
                answer = _answer(fb, [*history, {"role": "user", "content": line}], retriever, config, options)
            except FlashBackError as exc:  # e.g. the conversation outgrew the context: history left as it was
                console.print(f"\n[red]error:[/] {escape(str(exc))} [dim](/reset starts over)[/]")
                continue
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
