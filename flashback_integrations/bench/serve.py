"""Load on an OpenAI-compatible endpoint: ``flashback serve`` and llama.cpp's ``llama-server`` on the same GGUF.

Each level sends the same questions from ``concurrency`` clients at once, streamed, every answer ``max_tokens``
long (``ignore_eos``), and reports requests and tokens per second, the 50th/95th percentile time to first token
and time per output token, and (FlashBack) the passage-KV cache's hit rate from the server's ``/metrics``.
A "stuffed" row is what a LangChain stuff chain sends to llama-server: the question's top passage, retrieved
by the client from the same collection, in the user turn."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

QUESTIONS = (
    "How do I pretty-print JSON with the json module?",
    "How do I serve the files of a folder over HTTP from Python?",
    "How do I run two coroutines at the same time with asyncio?",
    "How do I read a CSV file into dictionaries?",
    "How do I parse command line arguments?",
    "How do I compute a SHA-256 digest of a file?",
    "How do I find all files matching a pattern in a folder tree?",
    "How do I measure how long a function takes?",
)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None, started: float | None = None
) -> dict[str, Any]:
    """One streamed chat completion: seconds to the first content, total seconds, tokens (from ``started``:
    a client that retrieves before it sends counts that time too)."""
    started = time.perf_counter() if started is None else started
    first, pieces, tokens = None, 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    first = first if first is not None else time.perf_counter() - started
                    pieces += 1
    total = time.perf_counter() - started
    return {"ttft_s": first, "total_s": total, "tokens": tokens if tokens is not None else pieces}


def segment_counts(url: str) -> tuple[float, float]:
    """(hits, misses) of the passage-KV cache from a FlashBack server's /metrics; (0, 0) elsewhere."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0, 0.0
    found = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("flashback_passage_cache_segments_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            found[result] = float(line.rsplit(" ", 1)[1])
    return found["hit"], found["miss"]


def run_level(
    url: str,
    make_body: Callable[[str], dict[str, Any]],
    concurrency: int,
    requests: int,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    hits0, misses0 = segment_counts(url)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    lock = threading.Lock()
    done: list[dict[str, Any]] = []

    def send(question: str) -> None:
        started = time.perf_counter()
        result = one_request(url, make_body(question), headers, started)
        with lock:
            done.append(result)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, questions))
    wall = time.perf_counter() - started
    hits1, misses1 = segment_counts(url)
    hits, misses = hits1 - hits0, misses1 - misses0
    ttft = [r["ttft_s"] for r in done if r["ttft_s"] is not None]
    per_token = [
        (r["total_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in done if r["ttft_s"] is not None and r["tokens"] > 1
    ]
    tokens = sum(r["tokens"] for r in done)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p95_s": percentile(ttft, 0.95),
        "tpot_p50_s": percentile(per_token, 0.5),
        "tpot_p95_s": percentile(per_token, 0.95),
        "mean_tokens": statistics.mean(r["tokens"] for r in done),
        "passage_cache_hit_rate": hits / (hits + misses) if hits + misses else None,
    }


def chat_body(model: str, max_tokens: int, **extra: Any) -> Callable[[str], dict[str, Any]]:
    def make(question: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            **extra,
        }

    return make


def stuffed_body(model: str, max_tokens: int, retriever: Any) -> Callable[[str], dict[str, Any]]:
    """A stuff chain's request: the top passage for the question (retrieved here, on the client, as the
    chain does before it calls the model) in the user turn."""
    plain = chat_body(model, max_tokens)

    def make(question: str) -> dict[str, Any]:
        passages = retriever.retrieve(question, 1)
        context = "\n\n".join(p.text for p in passages)
        body = plain(question)
        body["messages"] = [{"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]
        return body

    return make


def run_rows(
    rows: list[tuple[str, str, Callable[[str], dict[str, Any]]]],
    levels: list[int],
    requests: int,
    report: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (label, url, body factory) row at every concurrency level; one warm-up request per row first."""
    results = []
    for label, url, make_body in rows:
        one_request(url, make_body(QUESTIONS[0]))  # warm-up: weights paged in, first passages cached
        for level in levels:
            result = {"row": label, **run_level(url, make_body, level, requests)}
            results.append(result)
            if report is not None:
                report(label, result)
    return results


def plot(results: list[dict[str, Any]], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["row"] for r in results):
        rows = [r for r in results if r["row"] == label]
        levels = [r["concurrency"] for r in rows]
        left.plot(levels, [r["tokens_per_s"] for r in rows], marker="o", label=label)
        right.plot(levels, [r["ttft_p50_s"] for r in rows], marker="o", label=label)
    for ax, name in ((left, "tokens / s (all clients)"), (right, "time to first token, p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
