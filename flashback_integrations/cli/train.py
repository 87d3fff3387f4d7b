"""``flashback data build``, ``flashback train`` and ``flashback eval ppl``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from ..store.chroma import StoreLocation
from ..training.config import TrainConfig
from ..training.examples import ExampleSettings, ExampleSource
from .app import app, console, data_app, err_console, eval_app
from .options import Device, MaxExamples, Model, Out, Seed, Stem, with_settings


@data_app.command("build")
@with_settings(source=ExampleSource, settings=ExampleSettings, store=StoreLocation)
def data_build(
    out: Annotated[Path, typer.Argument(help="Output file (.jsonl.gz).")],
    val_out: Annotated[Path | None, typer.Option(help="Also write validation examples here.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held back for validation.")] = 0.05,
    max_examples: MaxExamples = None,
    max_val_examples: Annotated[int | None, typer.Option(help="At most N validation targets.")] = 512,
    model: Annotated[str, typer.Option(help="Reader model whose tokenizer sizes everything.")] = "default",
    seed: Seed = 0,
    *,
    source: ExampleSource,
    settings: ExampleSettings,
    store: StoreLocation,
) -> None:
    """Sample target windows, retrieve a passage for each (never from the target's own document), save."""
    from ..training.examples import examples_from, save_examples, summarize

    fraction = val_fraction if val_out else 0.0
    train, val, info = examples_from(source, store, model, settings, max_examples, fraction, max_val_examples, seed)
    meta = {"info": info, "model": model}
    save_examples(out, train, meta)
    console.print(f"wrote {out}: {summarize(train)}")
    if val_out:
        save_examples(val_out, val, {**meta, "split": "validation"})
        console.print(f"wrote {val_out}: {summarize(val)}")


@app.command()
@with_settings(cfg=TrainConfig, source=ExampleSource, settings=ExampleSettings, store=StoreLocation)
def train(
    out: Annotated[Path, typer.Argument(help="Adapter output folder.")],
    examples: Annotated[Path | None, typer.Option(help="Training examples from `flashback data build`.")] = None,
    val_examples: Annotated[Path | None, typer.Option(help="Validation examples file.")] = None,
    val_fraction: Annotated[float, typer.Option(help="With --docs: share of documents for validation.")] = 0.05,
    max_examples: MaxExamples = None,
    model: Model = "default",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.")] = False,
    teacher_adapter: Annotated[
        Path | None,
        typer.Option(help="Distil from the base + this prepend adapter, reading the passage in front."),
    ] = None,
    *,
    cfg: TrainConfig,
    source: ExampleSource,
    settings: ExampleSettings,
    store: StoreLocation,
) -> None:
    """Train the FlashBack adapter (LoRA + marking tokens) and write it with its manifest and loss curve."""
    from ..training.checkpoints import check_output_dir
    from ..training.examples import examples_from, load_examples, load_examples_file
    from ..training.setup import base_label, load_for_training
    from ..training.trainer import train as run_training

    check_output_dir(out)
    if cfg.distill_weight > 0 and teacher_adapter is None:
        raise ConfigError("--distill-weight needs --teacher-adapter (the prepend + LoRA + MT adapter).")
    if examples is not None:
        train_ex, data_info = load_examples_file(examples, max_examples, cfg.seed)
        if "settings" in data_info:
            settings = ExampleSettings.from_dict(data_info["settings"])
        val_ex = load_examples(val_examples)[0] if val_examples else []
    else:
        train_ex, val_ex, data_info = examples_from(
            source, store, model, settings, max_examples, val_fraction, 512, cfg.seed
        )
    data_info.pop("val_sources", None)
    base, tokenizer, teacher = load_for_training(model, teacher_adapter)
    if teacher_adapter is not None:
        data_info["teacher_adapter"] = str(teacher_adapter)
    result = run_training(
        base, tokenizer, train_ex, out, cfg, val_ex, settings, base_label(model), data_info, resume=resume,
        teacher=teacher,
    )  # fmt: skip
    note = f" (stopped early: {result.stopped_early}; rerun with --resume)" if result.stopped_early else ""
    console.print(f"adapter written to {out} after {result.steps} steps; validation loss {result.final_val_loss}{note}")


@eval_app.command("ppl")
@with_settings(source=ExampleSource, settings=ExampleSettings, store=StoreLocation)
def eval_ppl(
    out: Out = Path("benchmarks/results"),
    stem: Stem = "ppl",
    examples: Annotated[Path | None, typer.Option(help="Examples from `flashback data build`.")] = None,
    max_examples: Annotated[
        int | None,
        typer.Option(
            help="Targets to build from --docs (default 2000), or a seeded subset of --examples (default all)."
        ),
    ] = None,
    model: Model = "default",
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
    device: Device = None,
    batch_size: Annotated[int, typer.Option(help="Examples per forward.")] = 32,
    seed: Seed = 0,
    merge_from: Annotated[
        list[Path] | None,
        typer.Option(help="Partial results of the same command run under another --stem (rows scored in parallel)."),
    ] = None,
    *,
    source: ExampleSource,
    settings: ExampleSettings,
    store: StoreLocation,
) -> None:
    """Perplexity of no retrieval / prepend / append / isolated rows (with and without adapters) on the same targets."""
    from ..training.examples import examples_from, load_examples_file, save_examples
    from ..training.perplexity import markdown_table, run_eval, select_rows

    if examples is not None:
        ex, info = load_examples_file(examples, max_examples, seed)
    else:
        n = 2000 if max_examples is None else max_examples
        ex, _, info = examples_from(source, store, model, settings, n, 0.0, None, seed, exclude_all_docs=True)
        save_examples(out / f"{stem}.examples.jsonl.gz", ex, {"info": info, "model": model})
    adapters = (flashback_adapter, prepend_adapter, append_adapter, isolated_adapter)
    rows, skipped = select_rows(model, *adapters, row, tail_tokens)
    for name in skipped:
        err_console.print(f"[yellow]row {name!r} skipped: no adapter given for it[/]")
    meta = {"data": info, "skipped_rows": skipped}
    result = run_eval(ex, rows, out, stem, model, device, batch_size, meta=meta, merge_from=merge_from or ())
    console.print(markdown_table(result))
    console.print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')} and {out / (stem + '.png')}")
