"""Resident memory over many calls: does a long-lived model level off?

One model (the default: isolated layout + the shipped adapter) serves ``calls`` short generations, each
with a new random prompt and a new random passage at every retrieval, so the passage-KV cache and the
context pool fill with entries that are never hit again (their worst case). Every ``every`` calls the
process's RSS and the caches' sizes are recorded; the report says how much RSS grew over the last quarter.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from ..config import FlashBackConfig
from ..retrieval.base import Passage
from .models import random_id_source

MIB = 2**20


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def run_memory(
    calls: int,
    every: int,
    model: str = "default",
    prompt_tokens: int = 64,
    new_tokens: int = 16,
    passage_cache_mib: int | None = None,
    context_cache_mib: int | None = None,
    seed: int = 0,
    on_sample: Any = None,
) -> dict[str, Any]:
    from ..model import FlashBackModel

    sizes = {
        k: v * MIB
        for k, v in (("passage_cache_bytes", passage_cache_mib), ("context_cache_bytes", context_cache_mib))
        if v is not None
    }
    fb = FlashBackModel.from_pretrained(model, backend="torch", **sizes)
    random_ids = random_id_source(fb, seed)
    config = FlashBackConfig(stride=8, num_passages=2, max_doc_tokens=64)

    def retriever(query: str, k: int) -> list[Passage]:
        return [Passage(text="", token_ids=tuple(random_ids(64))) for _ in range(k)]

    pool = getattr(fb.backend, "pool", None)
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    for call in range(calls + 1):
        if call % every == 0:
            gc.collect()
            sample = {
                "calls": call,
                "rss_mib": round(rss_mib(), 1),
                "passage_cache_mib": round(fb.passage_cache.bytes / MIB, 1),
                "passage_cache_entries": len(fb.passage_cache),
                "context_pool_mib": round(pool.bytes / MIB, 1) if pool is not None else None,
                "context_pool_entries": len(pool) if pool is not None else None,
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
            samples.append(sample)
            if on_sample is not None:
                on_sample(sample)
        if call < calls:
            fb.generate(random_ids(prompt_tokens), retriever, config=config, max_new_tokens=new_tokens, ignore_eos=True)
    quarter = samples[-max(2, len(samples) // 4) :]
    return {
        "model": model,
        "mode": fb.resolve_config(config).mode,
        "calls": calls,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "passage_cache_limit_mib": fb.passage_cache.max_bytes / MIB,
        "context_pool_limit_mib": pool.max_bytes / MIB if pool is not None else None,
        "samples": samples,
        "rss_first_mib": samples[0]["rss_mib"],
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "rss_last_quarter_growth_mib": round(quarter[-1]["rss_mib"] - quarter[0]["rss_mib"], 1),
        "last_quarter_calls": quarter[-1]["calls"] - quarter[0]["calls"],
    }


def plot_memory(results: list[dict[str, Any]], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models import finish_plot

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        calls = [s["calls"] for s in r["samples"]]
        label = f"caches {r['passage_cache_limit_mib']:.0f} + {r['context_pool_limit_mib'] or 0:.0f} MiB"
        line = ax.plot(calls, [s["rss_mib"] for s in r["samples"]], label=f"RSS, {label}")
        caches = [s["passage_cache_mib"] + (s["context_pool_mib"] or 0) for s in r["samples"]]
        ax.plot(calls, caches, linestyle="--", color=line[0].get_color(), label=f"caches held, {label}")
    finish_plot(fig, ax, "calls", "MiB", title, path)
