"""``flashback bench``: store, speed and forward-cost benchmarks (JSON + PNG, a table on screen)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..bench.models import MODES as SPEED_MODES
from ..bench.models import NAMED_CONFIGS
from ..loading.devices import DTYPES
from .app import bench_app, console, fail, load_tokenizer, tokenizer_label
from .options import ChunkTokens, Out, Stem, Tokenizer

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
BenchModel = Annotated[
    str,
    typer.Option(
        help=f"'default', a hub id/path, config:NAME (random weights: {', '.join(NAMED_CONFIGS)}), or 'shipped' "
        "(speed: the default as a user loads it, isolated with its activated adapter unmerged)."
    ),
]
BenchDtype = Annotated[str, typer.Option(help=" | ".join(DTYPES))]
BenchDevice = Annotated[str, typer.Option(help="cpu | cuda")]
Stride = Annotated[int, typer.Option(help="Retrieve every N tokens.")]
DocTokens = Annotated[int, typer.Option(help="Tokens of each passage.")]
PromptTokens = Annotated[int | None, typer.Option(help="Prompt length (default: min(512, T/4)).")]
GenTokens = Annotated[int | None, typer.Option(help="Generated tokens (default: T - prompt - doc).")]
GgufDtype = Annotated[
    str | None,
    typer.Option(help="llamacpp/openai: float32 | float16 | q8_0 | q4_1 | q4_0 GGUF tensors (default: --dtype)."),
]


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]], first_left: bool = False) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if first_left and i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _command(name: str, options: dict[str, Any]) -> str:
    """The command line that reproduces a run (recorded in its JSON)."""
    return f"flashback bench {name} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in options.items() if v is not None
    )


@bench_app.command("store")
def bench_store(
    paths: Annotated[list[Path] | None, typer.Argument(help="Corpus (default: the Python 3.11 docs).")] = None,
    chunk_tokens: ChunkTokens = 128,
    tokenizer: Tokenizer = "default",
    queries: Annotated[int, typer.Option(help="Queries timed per mode.")] = 200,
    k: Annotated[int, typer.Option("-k", help="Chunks per query.")] = 1,
    out: Out = Path("benchmarks/results"),
    mode: Annotated[list[str] | None, typer.Option(help="embedded and/or server (default: both).")] = None,
) -> None:
    """Ingestion throughput and query latency p50/p95, embedded vs a Chroma server."""
    from ..bench.store import run_store_benchmark, write_outputs

    sizes = (("--queries", queries), ("-k", k), ("--chunk-tokens", chunk_tokens))
    bad = [f"{name}={value}" for name, value in sizes if value < 1]
    if bad:
        raise fail(ValueError(f"{', '.join(bad)}: must be at least 1"))
    unknown = [m for m in mode or [] if m not in ("embedded", "server")]
    if unknown:
        raise fail(ValueError(f"unknown --mode {unknown}; modes are embedded and server"))
    corpus = paths or [PYTHON_DOCS]
    for p in corpus:
        if not p.exists():
            hint = " (apt-get install python3.11-doc)" if p == PYTHON_DOCS else ""
            raise fail(FileNotFoundError(f"corpus path {p} does not exist{hint}"))
    results = run_store_benchmark(
        corpus,
        load_tokenizer(tokenizer),
        tokenizer_label(tokenizer),
        chunk_tokens=chunk_tokens,
        queries=queries,
        k=k,
        modes=tuple(mode or ("embedded", "server")),
    )
    json_path, png_path = write_outputs(results, out)
    rows = [
        [name, str(r["chunks"]), f"{r['ingest_chunks_per_s']:.1f}"]
        + [f"{r[key][q]:.1f}" for key in ("query_ms", "search_only_ms") for q in ("p50", "p95")]
        for name, r in results["modes"].items()
    ]
    columns = ("mode", "chunks", "ingest chunks/s", "query p50 ms", "query p95 ms", "search p50 ms", "search p95 ms")
    _table(f"Chroma store: {escape(', '.join(map(str, corpus)))}", columns, rows, first_left=True)
    console.print(f"wrote {json_path} and {png_path}")


@bench_app.command("speed")
def bench_speed(
    model: BenchModel = "default",
    lengths: Annotated[str, typer.Option(help="Comma-separated total lengths T.")] = "512,1024,2048",
    modes: Annotated[str, typer.Option(help="Comma-separated modes: " + ", ".join(SPEED_MODES) + ".")] = ",".join(
        SPEED_MODES
    ),
    stride: Stride = 16,
    doc_tokens: Annotated[int, typer.Option(help="Tokens of each random passage.")] = 128,
    prompt_tokens: PromptTokens = None,
    gen_tokens: GenTokens = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point (median reported).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Sequences generated together (lockstep batch).")] = 1,
    backends: Annotated[
        str,
        typer.Option(
            help="Comma-separated: torch, llamacpp, openai (llama.cpp's server on the same GGUF, started here, "
            "with its prefix-cache hits per retrieval), vllm (the same on vLLM, `make vllm`): side by side."
        ),
    ] = "torch",
    gguf_dtype: GgufDtype = None,
    tail_tokens: Annotated[
        int, typer.Option(help="isolated: history tokens that read the passages (the shipped default: 32).")
    ] = 1,
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
    out: Out = Path("benchmarks/results"),
    stem: Stem = "speed_cpu",
) -> None:
    """Wall-clock time of prepend vs append vs plain decoding as the sequence grows (JSON + PNG)."""
    from rich.progress import Progress

    from ..bench.speed import InProcessRunner, build_cases, plot, run_cases, run_in_subprocess, summarise

    settings = {
        "model": model, "lengths": lengths, "modes": modes, "stride": stride, "doc_tokens": doc_tokens,
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats, "batch_size": batch_size,
        "dtype": dtype, "device": device, "backends": backends, "gguf_dtype": gguf_dtype, "tail_tokens": tail_tokens,
    }  # fmt: skip
    try:
        cases = build_cases(**settings)
    except ValueError as exc:
        raise fail(exc) from exc
    isolate = not device.startswith("cuda") if isolate is None else isolate
    out.mkdir(parents=True, exist_ok=True)
    with Progress(console=console) as progress:
        task = progress.add_task("timing", total=len(cases))

        def report(case: Any, r: dict[str, Any] | None, seconds: float | None) -> None:
            where = f"{case.backend} {case.mode} T={case.total_tokens}"
            if seconds is None:
                progress.console.print(f"{where}: kept from {stem}.partial.json")
            else:  # one line per case as it finishes, so a run cut short still reports
                progress.console.print(
                    f"{where}: median {r['median_s']:.2f} s, {r['ms_per_token']:.1f} ms/token, peak "
                    f"{r['peak_memory_mb']:.0f} MB (case took {seconds:.1f} s with start-up)"
                    + (
                        f"; server cache served {r['cached_share_per_cycle_median']:.1%} of each cycle's prompt"
                        if r.get("cached_share_per_cycle_median") is not None
                        else ""
                    )
                )
            progress.advance(task)

        run = run_in_subprocess if isolate else InProcessRunner()
        results = run_cases(cases, run, out / f"{stem}.partial.json", resume, report)
    summary = summarise(results)
    summary["command"] = _command("speed", settings) + ("" if isolate else " --no-isolate")
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / f"{stem}.png", f"{model} {dtype} on {device}: stride {stride}, doc {doc_tokens}")
    keys = ("median_s", "ms_per_token", "tokens_per_s")
    rows = [
        [r.get("backend", "torch"), str(r["total_tokens"]), r["mode"], str(r.get("batch_size", 1))]
        + [f"{r[key]:.2f}" if key == "median_s" else f"{r[key]:.1f}" for key in keys]
        + [str(r["forward_tokens"]), f"{r['peak_memory_mb']:.0f}"]
        for r in results
    ]
    columns = ("T", "mode", "batch", "median s", "ms/step", "tokens/s", "tokens through model", "peak MB")
    columns = ("backend", *columns)
    _table(f"{model}, {dtype}, {device}", columns, rows)
    for total, row in summary["speedups"].items():
        console.print(f"T={total}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


@bench_app.command("turns")
def bench_turns(
    model: BenchModel = "default",
    backends: Annotated[str, typer.Option(help="Comma-separated: torch, llamacpp, openai.")] = "torch",
    mode: Annotated[str, typer.Option(help="none | append | prepend (every backend).")] = "append",
    turns: Annotated[int, typer.Option(help="Turns of the conversation.")] = 5,
    message_tokens: Annotated[int, typer.Option(help="Tokens of each user message (random words).")] = 96,
    answer_tokens: Annotated[int, typer.Option(help="Tokens generated per turn.")] = 32,
    dtype: BenchDtype = "float32",
    gguf_dtype: GgufDtype = None,
    seed: Annotated[int, typer.Option(help="Random messages and passages.")] = 0,
    out: Out = Path("benchmarks/results"),
    stem: Stem = "turns_cpu",
) -> None:
    """Time to first token per turn of a chat that re-sends its history: reuse across calls (JSON + PNG)."""
    from ..bench.turns import plot_turns, run_turns

    if turns < 1 or message_tokens < 1 or answer_tokens < 1:
        raise fail("--turns, --message-tokens and --answer-tokens must be at least 1.")
    settings = {
        "model": model, "mode": mode, "turns": turns, "message_tokens": message_tokens,
        "answer_tokens": answer_tokens, "dtype": dtype, "gguf_dtype": gguf_dtype, "seed": seed,
    }  # fmt: skip
    results = []
    for backend in [b.strip() for b in backends.split(",")]:
        console.print(f"{backend}: {turns} turns ...")
        try:
            results.append(run_turns(backend=backend, **settings))
        except (ValueError, RuntimeError) as exc:
            raise fail(exc) from exc
    out.mkdir(parents=True, exist_ok=True)
    summary = {"runs": results, "command": _command("turns", {**settings, "backends": backends})}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot_turns(results, out / f"{stem}.png", f"{model} {dtype}: chat re-sent each turn, mode {mode}")
    columns = ("backend", *(f"turn {i}" for i in range(1, turns + 1)), "last turn cold", "warm/cold")
    rows = [
        [r["backend"], *(f"{row['ttft_s'] * 1000:.0f} ms" for row in r["turns"])]
        + [f"{r['last_turn_cold_ttft_s'] * 1000:.0f} ms", f"{r['last_turn_warm_over_cold']:.2f}x"]
        for r in results
    ]
    _table(f"time to first token, {model}, mode {mode}", columns, rows, first_left=True)
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


@bench_app.command("memory")
def bench_memory(
    model: BenchModel = "default",
    calls: Annotated[int, typer.Option(help="Generations on one model.")] = 1000,
    every: Annotated[int, typer.Option(help="Record RSS every N calls.")] = 10,
    prompt_tokens: Annotated[int, typer.Option(help="Random prompt tokens per call.")] = 64,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per call.")] = 16,
    passage_cache_mib: Annotated[
        int | None, typer.Option(help="Passage-KV cache limit (default: the model's).")
    ] = None,
    context_cache_mib: Annotated[int | None, typer.Option(help="Context pool limit (default: the model's).")] = None,
    out: Out = Path("benchmarks/results"),
    stem: Stem = "memory_cpu",
) -> None:
    """RSS over many calls on one model, with its caches' sizes: does memory level off? (JSON + PNG)."""
    from ..bench.memory import plot_memory, run_memory

    if calls < 1 or every < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise fail(ValueError("--calls, --every, --prompt-tokens and --new-tokens must be at least 1."))
    settings = {
        "model": model, "calls": calls, "every": every, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "passage_cache_mib": passage_cache_mib, "context_cache_mib": context_cache_mib,
    }  # fmt: skip

    def show(sample: dict[str, Any]) -> None:
        console.print(
            f"call {sample['calls']:>5}: RSS {sample['rss_mib']:.0f} MiB, passage cache "
            f"{sample['passage_cache_mib']:.0f} MiB ({sample['passage_cache_entries']}), context pool "
            f"{sample['context_pool_mib'] or 0:.0f} MiB ({sample['context_pool_entries'] or 0}), "
            f"{sample['elapsed_s']:.0f}s"
        )

    result = run_memory(**settings, on_sample=show)
    out.mkdir(parents=True, exist_ok=True)
    result["command"] = _command("memory", {**settings, "stem": stem})
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot_memory([result], out / f"{stem}.png", f"{model}, mode {result['mode']}: RSS over {calls} calls")
    console.print(
        f"RSS {result['rss_first_mib']:.0f} -> max {result['rss_max_mib']:.0f} MiB; last "
        f"{result['last_quarter_calls']} calls: {result['rss_last_quarter_growth_mib']:+.0f} MiB. "
        f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}"
    )


@bench_app.command("forward")
def bench_forward(
    model: BenchModel = "default",
    lengths: Annotated[str, typer.Option(help="Comma-separated context lengths T.")] = "512,1024,2048,4096",
    stride: Stride = 16,
    doc_tokens: DocTokens = 128,
    batch_size: Annotated[int, typer.Option(help="Rows per forward.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed forwards per point (median reported).")] = 5,
    tail_tokens: Annotated[int, typer.Option(help="isolated: history tokens that read the passages.")] = 1,
    dtype: BenchDtype = "float32",
    device: BenchDevice = "cpu",
    prompt_tokens: PromptTokens = None,
    gen_tokens: GenTokens = None,
    out: Out = Path("benchmarks/results"),
    stem: Stem = "forward_cpu",
) -> None:
    """Cost of a decode step, an append re-feed and a prepend recompute at length T (JSON + PNG).

    The ratios explain `bench speed`: append costs (stride - 1 + refeed/decode) / stride of plain
    decoding, so it approaches plain decoding only where a re-feed costs about one decode step. With
    two or more lengths it also predicts each `bench speed` run by summing these costs over its steps.
    """
    from ..bench.forward import forward_costs, plot_forward_costs, predict_runs
    from ..bench.models import check_options, load_model, parse_lengths, plan_lengths

    try:
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"--batch-size and --repeats must be at least 1, got {batch_size} and {repeats}")
        if tail_tokens < 1:
            raise ValueError(f"--tail-tokens must be at least 1, got {tail_tokens}")
        check_options(model, dtype, device)
        points = parse_lengths(lengths)
        for total in points:  # fail before loading a model, not after timing it
            plan_lengths(total, doc_tokens, prompt_tokens, gen_tokens)
        fb = load_model(model, dtype, device)
        results = forward_costs(fb, points, stride, doc_tokens, batch_size, repeats, tail_tokens=tail_tokens)
    except ValueError as exc:
        raise fail(exc) from exc
    predicted = predict_runs(results, points, prompt_tokens, gen_tokens) if len(points) > 1 else []
    out.mkdir(parents=True, exist_ok=True)
    command = _command(
        "forward",
        {
            "model": model, "lengths": lengths, "stride": stride, "doc_tokens": doc_tokens,
            "batch_size": batch_size, "repeats": repeats, "dtype": dtype, "device": device,
            "tail_tokens": tail_tokens if tail_tokens != 1 else None, "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens,
        },
    )  # fmt: skip
    (out / f"{stem}.json").write_text(
        json.dumps({"runs": results, "predicted_runs": predicted, "command": command}, indent=2)
    )
    title = f"{model} {dtype} on {device}, batch {batch_size}: one forward at length T"
    plot_forward_costs(results, out / f"{stem}.png", title)
    formats = (
        ("decode ms", "decode_ms", ".1f"), ("re-feed ms", "refeed_ms", ".1f"), ("recompute ms", "recompute_ms", ".1f"),
        ("re-feed/decode", "refeed_over_decode", ".2f"), ("isolated warm/decode", "isolated_warm_over_decode", ".2f"),
        ("isolated cold/decode", "isolated_cold_over_decode", ".2f"),
        ("append/none (pred.)", "predicted_append_over_none", ".3f"),
        ("isolated warm/none (pred.)", "predicted_isolated_warm_over_none", ".3f"),
        ("prepend/append (pred.)", "predicted_prepend_over_append", ".2f"),
    )  # fmt: skip
    rows = [[str(r["total_tokens"])] + [format(r[key], fmt) for _, key, fmt in formats] for r in results]
    _table(f"{model}, {dtype}, {device}, batch {batch_size}", ("T", *(c for c, _, _ in formats)), rows)
    for p in predicted:
        secs = ", ".join(f"{mode} {s:.1f} s" for mode, s in p["predicted_s"].items())
        console.print(
            f"predicted `bench speed` T={p['total_tokens']} (prompt {p['prompt_tokens']}, {p['gen_tokens']} "
            f"generated): {secs}; prepend/append {p['prepend_over_append']}x, append/none {p['append_over_none']}; "
            f"isolated/none warm {p['isolated_warm_over_none']}, cold {p['isolated_cold_over_none']}"
        )
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
