"""Runtime of prepend (recompute), append (FlashBack) and plain cached decoding: METHOD.md's protocol.

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

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # random weights: shapes of public models, so 1B-7B can be timed without their weights
    "llama-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
    },
    "llama-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
    },
    "opt-125m": {
        "model_type": "opt",
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 768,
    },
    "opt-6.7b": {
        "model_type": "opt",
        "hidden_size": 4096,
        "ffn_dim": 16384,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 4096,
    },
}
MODES = ("prepend", "append", "isolated", "isolated-warm", "none")
WARM_POOL = 4
"""isolated-warm draws its passages from this many (a corpus repeats itself); isolated is cold (always new)."""


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


def plan_lengths(total: int, doc_tokens: int, prompt_tokens: int | None, gen_tokens: int | None) -> tuple[int, int]:
    """(prompt, generated) so that prompt + generated + doc = total; the paper uses a 512-token prompt."""
    if gen_tokens is not None:
        prompt = total - doc_tokens - gen_tokens
    else:
        prompt = prompt_tokens if prompt_tokens is not None else min(512, total // 4)
    gen = total - doc_tokens - prompt
    if prompt < 1 or gen < 1:
        raise ValueError(
            f"total length {total} leaves no room for prompt={prompt} and generation={gen} "
            f"with a {doc_tokens}-token doc"
        )
    return prompt, gen


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids ``t0..tN``: random-weight configs need no real vocabulary, and this
    one is built offline in milliseconds (the benchmark feeds token ids; text is only decoded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def fill_random(model, std: float = 0.02, pool: int = 1 << 20) -> None:
    """Give every weight random values from a 1M-value pool (tiled): timing does not depend on the values,
    and drawing 1B+ fresh normals takes ~15 s on a small CPU (transformers' own init is slower still)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(pool + 7919, generator=gen) * std
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat = p.view(-1)
            src = values[(i * 104729) % 7919 :][:pool].to(device=p.device, dtype=p.dtype)
            for start in range(0, flat.numel(), pool):
                n = min(pool, flat.numel() - start)
                flat[start : start + n].copy_(src[:n])


def check_options(model: str, dtype: str, device: str, modes: list[str] | None = None) -> None:
    """Fail on a bad name before any process starts or any weights load."""
    from ..loading.devices import resolve_device, resolve_dtype

    resolve_dtype(dtype)
    resolve_device(device)
    if model.startswith("config:") and model.removeprefix("config:") not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {model!r}; named configs are {', '.join(NAMED_CONFIGS)} (as config:NAME).")
    unknown = [m for m in modes or [] if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; modes are {', '.join(MODES)}.")


def parse_lengths(lengths: str) -> list[int]:
    try:
        points = [int(t) for t in lengths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths takes comma-separated whole numbers (e.g. 512,1024), got {lengths!r}") from None
    if any(t < 1 for t in points):
        raise ValueError(f"--lengths must be positive, got {lengths!r}")
    return points


def load_model(name: str, dtype: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..loading.devices import resolve_dtype
    from ..model import FlashBackModel, shipped_adapter

    check_options(name, dtype, device)
    if name.startswith("config:"):
        from transformers.initialization import no_init_weights

        spec = dict(NAMED_CONFIGS[name.removeprefix("config:")])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        fill_random(model)
        return FlashBackModel(model.eval(), synthetic_tokenizer(config.vocab_size), name=name)
    # merged weights (the append adapter for "default", as before): every mode runs the same kernels and
    # the block carries its marks; an activated adapter's unmerged LoRA is timed apart (bench_activation)
    adapter = shipped_adapter("append") if name == "default" else None
    return FlashBackModel.from_pretrained(name, adapter=adapter or "none", dtype=dtype, device=device)


def random_id_source(fb: Any, seed: int) -> Callable[[int], list[int]]:
    """Seeded random input ids that skip every special id (the default model's marks are the highest ids)."""
    import torch

    vocab = min(fb.model.get_input_embeddings().weight.shape[0], len(fb.tokenizer))
    special = set(fb.tokenizer.all_special_ids or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    gen = torch.Generator().manual_seed(seed)

    def random_ids(n: int) -> list[int]:
        return allowed[torch.randint(0, len(allowed), (n,), generator=gen)].tolist()

    return random_ids


def run_case(case: SpeedCase, fb: Any = None) -> dict[str, Any]:
    """Warm-up, then timed generations; loads the model unless a loaded one is passed in."""
    import torch

    from ..config import FlashBackConfig
    from ..retrieval.base import Passage

    load_started = time.perf_counter()
    reused = fb is not None
    fb = fb if reused else load_model(case.model, case.dtype, case.device)
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
        marks=False,
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
    with sampler:
        for _ in range(case.repeats):
            seconds, forwarded = once(case.gen_tokens)
            times.append(seconds)
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
        else "process peak RSS while generating" + (", in a process shared with earlier cases" if reused else ""),
        "rss_after_load_mb": round(rss_before, 1),
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "model_reused": reused,
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
        self._key: tuple[str, str, str] | None = None
        self._fb: Any = None

    def __call__(self, case: SpeedCase) -> dict[str, Any]:
        key = (case.model, case.dtype, case.device)
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
    by_length: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_length.setdefault(r["total_tokens"], {})[r["mode"]] = r
    speedups = {}
    for total, modes in sorted(by_length.items()):
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
        speedups[str(total)] = row
    return {"runs": results, "speedups": speedups}


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
    for mode in MODES:
        points = sorted((r["total_tokens"], r["median_s"]) for r in summary["runs"] if r["mode"] == mode)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=labels[mode])
    for total, row in summary["speedups"].items():
        if "prepend_over_append" in row:
            append = next(r for r in summary["runs"] if r["mode"] == "append" and r["total_tokens"] == int(total))
            ax.annotate(
                f"{row['prepend_over_append']}x",
                (int(total), append["median_s"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
            )
    _finish_plot(fig, ax, "sequence length T (tokens)", "wall-clock seconds (median)", title, path)


def forward_costs(
    fb: Any,
    lengths: list[int],
    stride: int = 16,
    doc_tokens: int = 128,
    batch_size: int = 1,
    repeats: int = 5,
    seed: int = 0,
    tail_tokens: int = 1,
) -> list[dict[str, Any]]:
    """Time the three forwards a retrieval cycle is made of, at context length T, through ``KVContext``.

    A cycle of ``stride`` tokens costs ``stride - 1`` one-token decode steps plus one retrieval
    forward: append re-feeds ``stride + doc_tokens`` ids after the kept cache (marks off, as in
    ``run_case``); prepend recomputes all T ids. So the ratios that ``bench speed`` measures follow
    from ``refeed/decode`` and ``recompute/decode`` on the machine at hand: this is METHOD.md's cost
    model with measured, not counted, costs.
    """
    import torch

    from ..engine.loop import KVContext

    device = next(fb.model.parameters()).device
    cuda = device.type == "cuda"
    random_ids = random_id_source(fb, seed)

    def rows(n: int) -> list[list[int]]:
        return [random_ids(n) for _ in range(batch_size)]

    def timed(kv: KVContext, ctxs: list[list[int]]) -> float:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        kv.next_logits_rows(ctxs)
        if cuda:
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started)

    tail = stride + doc_tokens
    results = []
    for i, total in enumerate(lengths):
        if total <= tail:
            raise ValueError(f"length {total} must exceed stride + doc tokens ({tail})")
        base = rows(total - 1)
        kv = KVContext(fb.model)
        kv.next_logits_rows(base)
        samples: dict[str, list[float]] = {
            "decode": [],
            "refeed": [],
            "recompute": [],
            "isolated_warm": [],
            "isolated_cold": [],
        }
        for name, ms_list in isolated_costs(
            fb, total, stride, doc_tokens, batch_size, repeats + (i == 0), seed, tail_tokens
        ).items():
            samples[name] = ms_list[1:] if i == 0 else ms_list
        for rep in range(repeats + (1 if i == 0 else 0)):  # one warm-up round before the first length
            refeed = [b[: total - tail] + r for b, r in zip(base, rows(tail), strict=True)]
            got = {
                "decode": timed(kv, [b + r for b, r in zip(base, rows(1), strict=True)]),  # keeps T-1, feeds 1
                "refeed": timed(kv, refeed),  # keeps T - tail, feeds tail
                "recompute": timed(KVContext(fb.model), [b + r for b, r in zip(base, rows(1), strict=True)]),
            }
            base = [c[:-1] for c in refeed]  # the cache now holds `refeed`: the next decode feeds one id
            if i or rep:
                for name, ms in got.items():
                    samples[name].append(ms)
        ms = {name: statistics.median(v) for name, v in samples.items()}
        x, y = ms["refeed"] / ms["decode"], ms["recompute"] / ms["decode"]
        warm, cold = ms["isolated_warm"] / ms["decode"], ms["isolated_cold"] / ms["decode"]
        results.append(
            {
                "total_tokens": total,
                "batch_size": batch_size,
                "stride": stride,
                "doc_tokens": doc_tokens,
                "repeats": repeats,
                "tail_tokens": tail_tokens,
                **{f"{name}_ms": round(v, 2) for name, v in ms.items()},
                "refeed_over_decode": round(x, 2),
                "recompute_over_decode": round(y, 2),
                # a cycle at length T: stride - 1 decode steps plus the retrieval forward
                "predicted_append_over_none": round((stride - 1 + x) / stride, 3),
                "predicted_prepend_over_append": round((stride - 1 + y) / (stride - 1 + x), 2),
                "isolated_warm_over_decode": round(warm, 2),
                "isolated_cold_over_decode": round(cold, 2),
                "predicted_isolated_warm_over_none": round((stride - 1 + warm) / stride, 3),
                "predicted_isolated_cold_over_none": round((stride - 1 + cold) / stride, 3),
            }
        )
    return results


def isolated_costs(
    fb: Any, total: int, stride: int, doc_tokens: int, batch_size: int, repeats: int, seed: int, tail: int = 1
) -> dict[str, list[float]]:
    """Milliseconds of one isolated-layout retrieval at context length ``total`` through ``KVContext``,
    from the state the previous retrieval left (head, passage, ``tail + stride - 1`` tail ids)."""
    import torch

    from ..engine.kv import PassageKVCache
    from ..engine.layout import Span
    from ..engine.loop import KVContext

    cuda = next(fb.model.parameters()).device.type == "cuda"
    random_ids = random_id_source(fb, seed + 1)
    out: dict[str, list[float]] = {"isolated_warm": [], "isolated_cold": []}

    def spans(history: list[int], seg: tuple[int, ...], cut: int) -> list[Span]:
        return [Span(tuple(history[:cut])), Span(seg, -len(seg), True), Span(tuple(history[cut:]))]

    for name in out:
        kv = KVContext(fb.model, PassageKVCache(), fingerprint=0)
        hist = [random_ids(total - doc_tokens - stride) for _ in range(batch_size)]
        segs = [tuple(random_ids(doc_tokens)) for _ in range(batch_size)]
        for _ in range(repeats):
            new = [h + random_ids(stride) for h in hist]
            cut = len(hist[0]) - tail
            kv.next_logits_rows([spans(h[:-1], s, cut) for h, s in zip(new, segs, strict=True)])  # the stride so far
            if name == "isolated_cold":
                segs = [tuple(random_ids(doc_tokens)) for _ in range(batch_size)]
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            kv.next_logits_rows([spans(h, s, len(h) - tail) for h, s in zip(new, segs, strict=True)])
            if cuda:
                torch.cuda.synchronize()
            out[name].append(1000 * (time.perf_counter() - started))
            hist = new
    return out


def _cost_at(results: list[dict[str, Any]], key: str, length: float) -> float:
    """Piecewise-linear in T through the measured points, extended linearly past both ends."""
    points = sorted((r["total_tokens"], r[key]) for r in results)
    if len(points) == 1:
        return points[0][1]
    i = next((k for k in range(1, len(points) - 1) if length <= points[k][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (length - x0) / (x1 - x0), 0.0)


def predict_runs(
    results: list[dict[str, Any]],
    totals: list[int],
    prompt_tokens: int | None = None,
    gen_tokens: int | None = None,
    refeed_ms: float | None = None,
) -> list[dict[str, Any]]:
    """Seconds ``bench speed`` should take per mode, summed from ``forward_costs`` over a run's steps.

    A run prefills the prompt (plus the passage when retrieving), then at every ``stride``-th
    generated token append re-feeds ``stride + doc`` ids and prepend recomputes the whole context,
    and every other token is one decode step; each forward is costed at its context length. Checks
    the cost model against measured runs, and ``refeed_ms`` asks what a re-feed of that cost would give.
    """
    stride, doc = results[0]["stride"], results[0]["doc_tokens"]
    predicted = []
    for total in totals:
        prompt, gen = plan_lengths(total, doc, prompt_tokens, gen_tokens)
        none = _cost_at(results, "recompute_ms", prompt)
        append = prepend = warm = cold = _cost_at(results, "recompute_ms", prompt + doc)
        has_isolated = all("isolated_warm_ms" in r for r in results)
        for i in range(1, gen):
            none += _cost_at(results, "decode_ms", prompt + i)
            length = prompt + doc + i
            if i % stride:
                step = _cost_at(results, "decode_ms", length)
                append, prepend, warm, cold = append + step, prepend + step, warm + step, cold + step
            else:
                append += refeed_ms if refeed_ms is not None else _cost_at(results, "refeed_ms", length)
                prepend += _cost_at(results, "recompute_ms", length)
                if has_isolated:
                    warm += _cost_at(results, "isolated_warm_ms", length)
                    cold += _cost_at(results, "isolated_cold_ms", length)
        predicted.append(
            {
                "total_tokens": total,
                "prompt_tokens": prompt,
                "gen_tokens": gen,
                "predicted_s": {
                    m: round(v / 1000, 2) for m, v in (("prepend", prepend), ("append", append), ("none", none))
                },
                "prepend_over_append": round(prepend / append, 2),
                "append_over_none": round(append / none, 3),
                **(
                    {
                        "isolated_predicted_s": {"warm": round(warm / 1000, 2), "cold": round(cold / 1000, 2)},
                        "isolated_warm_over_none": round(warm / none, 3),
                        "isolated_cold_over_none": round(cold / none, 3),
                    }
                    if has_isolated
                    else {}
                ),
            }
        )
    return predicted


def plot_forward_costs(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    lengths = [r["total_tokens"] for r in results]
    tail = results[0]["stride"] + results[0]["doc_tokens"]
    for key, label in (
        ("recompute_ms", "prepend retrieval: recompute all T ids"),
        ("refeed_ms", f"append retrieval: re-feed {tail} ids"),
        ("isolated_cold_ms", "isolated retrieval, cold (new passage)"),
        ("isolated_warm_ms", "isolated retrieval, warm (passage cached)"),
        ("decode_ms", "decode step: 1 id"),
    ):
        if all(key in r for r in results):
            ax.plot(lengths, [r[key] for r in results], marker="o", label=label)
    for r in results:
        ax.annotate(
            f"{r['refeed_over_decode']}x",
            (r["total_tokens"], r["refeed_ms"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_yscale("log")
    _finish_plot(fig, ax, "context length T (tokens)", "ms per forward (median)", title, path)


def _finish_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # worker entry point: one case, JSON on the last line of stdout
    print(json.dumps(run_case(SpeedCase(**json.loads(sys.argv[1])))))
