"""Runtime of prepend (recompute), append (FlashBack) and plain cached decoding: docs/method.md's protocol.

Random-token prompt, greedy decoding with a fresh random ``doc_tokens`` passage every ``stride``
tokens, the same engine, dtype and kernels for every mode, last-position logits only. On a CPU each
(mode, length) runs in its own process so peak RSS is per mode; on a GPU all run in one process
(peak memory is per case there anyway). A warm-up generation precedes ``repeats`` timed ones and the
median wall-clock time is reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .models import (
    BENCH_BACKENDS,
    MODES,
    SHIPPED,
    WARM_POOL,
    check_options,
    finish_plot,
    load_model,
    parse_lengths,
    plan_lengths,
    random_id_source,
)


@dataclass
class SpeedCase:
    model: str
    mode: str
    total_tokens: int
    prompt_tokens: int
    gen_tokens: int
    stride: int = 16
    doc_tokens: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    seed: int = 0
    batch_size: int = 1
    backend: str = "torch"
    gguf_dtype: str | None = None
    """llamacpp/openai: the GGUF's tensors (float32, float16, q8_0; default: ``dtype``)."""
    tail_tokens: int = 1
    """isolated modes: history tokens that read the passages (a retrieval re-feeds ``stride + tail_tokens``)."""


def run_case(case: SpeedCase, fb: Any = None) -> dict[str, Any]:
    """Warm-up, then timed generations; loads the model unless a loaded one is passed in."""
    import torch

    from ..config import FlashBackConfig
    from ..retrieval.base import Passage

    load_started = time.perf_counter()
    reused = fb is not None
    fb = fb if reused else load_model(case.model, case.dtype, case.device, case.backend, case.gguf_dtype)
    load_s = time.perf_counter() - load_started
    random_ids = random_id_source(fb, case.seed)

    pool = [tuple(random_ids(case.doc_tokens)) for _ in range(WARM_POOL)]
    drawn = iter(range(1 << 62))

    def retriever(query: str, k: int) -> list[Passage]:
        if case.mode == "isolated-warm":
            return [Passage(text="", token_ids=pool[next(drawn) % WARM_POOL])]
        return [Passage(text="", token_ids=tuple(random_ids(case.doc_tokens)))]

    config = FlashBackConfig(
        mode="isolated" if case.mode == "isolated-warm" else case.mode,
        stride=case.stride,
        num_passages=1,
        max_doc_tokens=case.doc_tokens,  # type: ignore[arg-type]
        query_tokens=32,
        marks=None if case.model == SHIPPED else False,  # the shipped adapter reads its passages between marks
        tail_tokens=case.tail_tokens,
    )
    use = retriever if case.mode != "none" else None
    cuda = case.device.startswith("cuda")

    def once(n: int) -> tuple[float, int]:
        prompts = [random_ids(case.prompt_tokens) for _ in range(case.batch_size)]
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        if case.batch_size == 1:  # the product path: FlashBackModel.generate
            forwarded = fb.generate(prompts[0], use, config=config, max_new_tokens=n, ignore_eos=True).forward_tokens
        else:  # rows in lockstep, one batched forward per step (same KVContext)
            forwarded = fb.generate_batch(prompts, use, config=config, max_new_tokens=n)[0].forward_tokens
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, forwarded

    once(min(case.gen_tokens, 2 * case.stride + 1))  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    # no sampler thread on a GPU: GPU decoding is bound by Python's kernel launches, which it would slow
    sampler = _RssSampler() if not cuda else contextlib.nullcontext(None)
    times: list[float] = []
    forwarded = 0
    server = getattr(fb.backend, "stats", None)
    if server is not None:
        server.per_request.clear()  # the timed runs' requests only
    with sampler:
        for _ in range(case.repeats):
            seconds, forwarded = once(case.gen_tokens)
            times.append(seconds)
    cache_use = _server_cache_use(case, list(server.per_request)) if server is not None else {}
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else sampler.peak_mb  # type: ignore[union-attr]
    return {
        **asdict(case),
        "seconds": times,
        "median_s": statistics.median(times),
        "ms_per_token": 1000 * statistics.median(times) / case.gen_tokens,
        "tokens_per_s": case.batch_size * case.gen_tokens / statistics.median(times),
        "forward_tokens": forwarded,
        "peak_memory_mb": round(peak, 1),
        "memory_kind": "cuda max_memory_allocated"
        if cuda
        else "process peak RSS while generating"
        + (", in a process shared with earlier cases" if reused else "")
        + (" (the client's: the server's memory is not counted)" if server is not None else ""),
        "rss_after_load_mb": round(rss_before, 1),
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "model_reused": reused,
        **cache_use,
    }


def _server_cache_use(case: SpeedCase, requests: list[tuple[int, int]]) -> dict[str, Any]:
    """Prompt tokens the server took from its prefix cache, as it reported them: per retrieval cycle (every
    request of a generation but its first, whose prompt is new) and in all."""
    per_generation = -(-case.gen_tokens // case.stride) if case.mode != "none" else 1
    cycles = [r for i, r in enumerate(requests) if i % per_generation != 0]
    shares = [cached / sent for sent, cached in cycles if sent]
    return {
        "server_requests": len(requests),
        "server_prompt_tokens": sum(s for s, _ in requests),
        "server_cached_tokens": sum(c for _, c in requests),
        "cached_share_per_cycle_median": round(statistics.median(shares), 4) if shares else None,
        "cached_share_per_cycle_min": round(min(shares), 4) if shares else None,
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssSampler:
    """Peak resident memory while generating, sampled every 2 ms (ru_maxrss would include model loading)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(0.002)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def run_in_subprocess(case: SpeedCase) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "flashback_integrations.bench.speed", json.dumps(asdict(case))],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"speed worker failed for {case.mode} T={case.total_tokens}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class InProcessRunner:
    """Runs cases in this process, loading each model once: on a GPU peak memory is measured per case
    (``max_memory_allocated`` after a reset), so a process per case would only add start-up time."""

    def __init__(self) -> None:
        self._key: tuple[str, str, str, str, str | None] | None = None
        self._fb: Any = None

    def __call__(self, case: SpeedCase) -> dict[str, Any]:
        key = (case.model, case.dtype, case.device, case.backend, case.gguf_dtype)
        if key != self._key:
            self._key, self._fb = None, None  # free the previous model before loading the next
            started = time.perf_counter()
            self._fb, self._key = load_model(*key), key
            return {
                **run_case(case, self._fb),
                "load_s": round(time.perf_counter() - started, 2),
                "model_reused": False,
            }
        return run_case(case, self._fb)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios per length: between modes on each backend (keys prefixed by the backend unless torch), and
    each mode on torch over the same mode on another backend (``append_torch_over_llamacpp``)."""
    grouped: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault((r.get("backend", "torch"), r["total_tokens"]), {})[r["mode"]] = r
    speedups: dict[str, dict[str, float]] = {}
    for (backend, total), modes in sorted(grouped.items()):
        prefix = "" if backend == "torch" else f"{backend}_"
        row = speedups.setdefault(str(total), {})
        for key, value in _mode_ratios(modes).items():
            row[prefix + key] = value
        reference = grouped.get(("torch", total), {})
        if backend != "torch":
            for mode, r in modes.items():
                if mode in reference:
                    row[f"{mode}_torch_over_{backend}"] = round(reference[mode]["median_s"] / r["median_s"], 2)
    return {"runs": results, "speedups": speedups}


def _mode_ratios(modes: dict[str, dict[str, Any]]) -> dict[str, float]:
    row = {}
    if "prepend" in modes and "append" in modes:
        row["prepend_over_append"] = round(modes["prepend"]["median_s"] / modes["append"]["median_s"], 2)
    if "none" in modes and "append" in modes:
        row["append_over_none"] = round(modes["append"]["median_s"] / modes["none"]["median_s"], 3)
    for iso in ("isolated", "isolated-warm"):
        key = iso.replace("-", "_")
        if iso in modes and "none" in modes:
            row[f"{key}_over_none"] = round(modes[iso]["median_s"] / modes["none"]["median_s"], 3)
        if iso in modes and "append" in modes:
            row[f"append_over_{key}"] = round(modes["append"]["median_s"] / modes[iso]["median_s"], 3)
    return row


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = {
        "prepend": "prepend (In-Context RALM, recompute)",
        "append": "append (FlashBack)",
        "isolated": "isolated, cold (a new passage each time)",
        "isolated-warm": f"isolated, warm ({WARM_POOL} passages recur)",
        "none": "plain cached decoding (floor)",
    }
    backends = sorted({r.get("backend", "torch") for r in summary["runs"]}, key=lambda b: b != "torch")
    for backend in backends:
        for mode in MODES:
            runs = [r for r in summary["runs"] if r["mode"] == mode and r.get("backend", "torch") == backend]
            points = sorted((r["total_tokens"], r["median_s"]) for r in runs)
            if points:
                label = labels[mode] + ("" if backend == "torch" else f" on {backend}")
                style = "-" if backend == "torch" else "--"
                ax.plot(*zip(*points, strict=True), style, marker="o", label=label)
    for total, row in summary["speedups"].items():
        if "prepend_over_append" in row:
            append = next(
                r
                for r in summary["runs"]
                if r["mode"] == "append" and r["total_tokens"] == int(total) and r.get("backend", "torch") == "torch"
            )
            ax.annotate(
                f"{row['prepend_over_append']}x",
                (int(total), append["median_s"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
            )
    finish_plot(fig, ax, "sequence length T (tokens)", "wall-clock seconds (median)", title, path)


def build_cases(
    model: str,
    lengths: str,
    modes: str,
    stride: int,
    doc_tokens: int,
    prompt_tokens: int | None,
    gen_tokens: int | None,
    repeats: int,
    batch_size: int,
    dtype: str,
    device: str,
    backends: str = "torch",
    gguf_dtype: str | None = None,
    tail_tokens: int = 1,
) -> list[SpeedCase]:
    """One case per (length, backend, mode), every setting checked before any process starts."""
    for option, value in (("--batch-size", batch_size), ("--repeats", repeats), ("--tail-tokens", tail_tokens)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    names = [m.strip() for m in modes.split(",")]
    check_options(model, dtype, device, names)
    cases = []
    engines = [b.strip() for b in backends.split(",")]
    unknown = [b for b in engines if b not in BENCH_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; backends are {', '.join(BENCH_BACKENDS)}.")
    if set(engines) - {"torch", "llamacpp"} and ({"isolated", "isolated-warm"} & set(names)):
        raise ValueError("the openai and vllm backends time none, prepend and append (isolated: torch, llamacpp).")
    if set(engines) - {"torch"} and batch_size > 1:
        raise ValueError("the llamacpp, openai and vllm backends time batch size 1.")
    if model == SHIPPED and set(engines) - {"torch", "llamacpp"}:
        raise ValueError(f"--model {SHIPPED} (the activated adapter, unmerged) runs on torch and llamacpp.")
    if model == SHIPPED and {"append", "prepend"} & set(names):
        raise ValueError(f"--model {SHIPPED} is the isolated adapter: time none, isolated and isolated-warm.")
    shared = {"model": model, "stride": stride, "doc_tokens": doc_tokens, "dtype": dtype, "device": device}
    shared |= {"repeats": repeats, "batch_size": batch_size, "tail_tokens": tail_tokens}
    for total in parse_lengths(lengths):
        prompt, gen = plan_lengths(total, doc_tokens, prompt_tokens, gen_tokens)
        for backend, mode in ((b, m) for b in engines for m in names):
            sizes = {"total_tokens": total, "prompt_tokens": prompt, "gen_tokens": gen}
            gguf = gguf_dtype if backend != "torch" else None
            cases.append(SpeedCase(mode=mode, backend=backend, gguf_dtype=gguf, **sizes, **shared))
    return cases


def run_cases(
    cases: list[SpeedCase],
    run: Callable[[SpeedCase], dict[str, Any]],
    partial: Path,
    resume: bool,
    report: Callable[[SpeedCase, dict[str, Any] | None, float | None], None],
) -> list[dict[str, Any]]:
    """Run each case, writing every finished one to ``partial`` so that a stopped run reports what it
    did and ``resume`` keeps the cases it finished with exactly these settings. ``report(case, result,
    seconds)`` is told of each (``seconds`` None: kept from the partial file)."""
    finished = json.loads(partial.read_text()) if resume and partial.is_file() else []
    results: list[dict[str, Any]] = []
    for case in cases:
        same = [r for r in finished if {k: r.get(k) for k in asdict(case)} == asdict(case)]
        if same:
            results.append(same[0])
            report(case, same[0], None)
            continue
        started = time.perf_counter()
        results.append(run(case))
        partial.write_text(json.dumps(results, indent=1))
        report(case, results[-1], time.perf_counter() - started)
    partial.unlink(missing_ok=True)
    return results


if __name__ == "__main__":  # worker entry point: one case, JSON on the last line of stdout
    print(json.dumps(run_case(SpeedCase(**json.loads(sys.argv[1])))))
