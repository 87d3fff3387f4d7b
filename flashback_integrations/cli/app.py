"""The command group, its consoles, and the printing shared by commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ..config import LoadSettings
from ..errors import FlashBackError
from ..events import Retrieval


class _Group(TyperGroup):
    """Every FlashBackError that reaches the top (any command) is one line on stderr and exit 2, never a
    traceback: each error names the problem and the fix."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlashBackError as exc:
            Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from exc


def sub_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, cls=_Group)


app = typer.Typer(
    help="FlashBack: retrieval-augmented generation with KV-cache reuse.", no_args_is_help=True, cls=_Group
)
index_app = sub_app("Build and inspect Chroma collections (embedded or a Chroma server).")
bench_app = sub_app("Benchmarks that print figures and write JSON + PNG.")
data_app = sub_app("Build training/evaluation examples (targets + retrieved passages).")
eval_app = sub_app("Quality evaluation.")


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show libraries' progress bars and warnings, and this package's log."
    ),
) -> None:
    """FlashBack: retrieval-augmented generation with KV-cache reuse."""
    quiet_libraries(not verbose)


def quiet_libraries(quiet: bool = True) -> None:
    """A command's output is its own: no loading bars or library warnings unless asked (``--verbose``, which
    also shows this package's log: the mode each model resolved to, and why)."""
    import logging
    import warnings

    import huggingface_hub.utils
    import transformers

    if quiet:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        huggingface_hub.utils.disable_progress_bars()
        for module in ("transformers", "peft", "torch", "huggingface_hub", "sentence_transformers", "chromadb"):
            warnings.filterwarnings("ignore", module=module)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return
    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flashback_integrations").setLevel(logging.INFO)


app.add_typer(index_app, name="index")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
console = Console()
err_console = Console(stderr=True)


def fail(exc: Exception) -> typer.Exit:
    """A bad value that is not a FlashBackError (a benchmark's sizes, a missing corpus): one line, exit 2."""
    err_console.print(f"[red]error:[/] {escape(str(exc))}")
    return typer.Exit(2)


def load_model(load: LoadSettings, mode: str | None = None) -> Any:
    """The model (with ``load.adapter``, or for ``"default"`` the shipped adapter of ``mode``), shared."""
    from ..model import FlashBackModel

    label = load.model + (" + " + load.adapter if load.adapter else "")
    with console.status(f"Loading {label} ..."):
        started = time.perf_counter()
        fb = FlashBackModel.shared(load.model, adapter=load.adapter, mode=mode, **load.load_kwargs())
    console.print(
        f"[dim]loaded {fb.name} in {time.perf_counter() - started:.1f}s; marks available: {fb.mark_ids is not None}[/]"
    )
    return fb


def passage_label(p: Any) -> str:
    if "source_name" in p.metadata:
        return f"{p.metadata['source_name']}#{p.metadata.get('chunk_index', '?')}"
    return Path(p.id).name if p.id else "?"


def print_retrieval(r: Retrieval) -> None:
    if r.error:
        console.print(f"[yellow]  retrieval @ token {r.step} skipped:[/] {escape(r.error)}")
        return
    ids = escape(", ".join(passage_label(p) for p in r.passages) or "none")
    segments = r.segments_computed + r.segments_reused
    cached = f", passages {r.segments_reused}/{segments} from cache" if segments else ""
    console.print(
        f"[cyan]  retrieval @ token {r.step}[/] query={escape(repr(r.query[-60:]))} -> {ids}: "
        f"block={r.block_tokens} tok, kept {r.reused_tokens} cached, recomputed {r.prefill_tokens}{cached}, "
        f"{r.latency_s * 1000:.1f} ms"
    )


def tokenizer_label(name: str) -> str:
    from ..loading.resolve import DEFAULT_MODEL_ID

    return DEFAULT_MODEL_ID if name == "default" else name


def load_tokenizer(name: str) -> Any:
    """The reader model's tokenizer, used to size chunks in the reader's own tokens."""
    from ..loading.resolve import load_pretrained, resolve_model

    return load_pretrained(resolve_model(name), "tokenizer")
