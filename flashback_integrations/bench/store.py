"""Ingestion throughput and query latency of the Chroma store, embedded and server side by side."""

from __future__ import annotations

import contextlib
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..retrieval.adapt import read_collection
from ..store import ChromaRetriever, Embedder, connect, ingest
from ..store.chroma import get_collection
from ..store.server import ChromaServer


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_store_benchmark(
    paths: list[Path],
    tokenizer: Any,
    tokenizer_name: str,
    chunk_tokens: int = 128,
    queries: int = 200,
    k: int = 1,
    embedding_model: str = "default",
    modes: tuple[str, ...] = ("embedded", "server"),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest ``paths`` from scratch in each mode, then time ``queries`` retrievals of ``k`` chunks."""
    embedder = Embedder(embedding_model)
    embedder.embed_query("warm-up")
    results: dict[str, Any] = {
        "corpus": [str(p) for p in paths],
        "chunk_tokens": chunk_tokens,
        "tokenizer": tokenizer_name,
        "embedding_model": embedder.name,
        "queries": queries,
        "k": k,
        "machine": {
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
        },
        "modes": {},
    }
    query_texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="flashback-bench-") as tmp, contextlib.ExitStack() as stack:
        for mode in modes:
            if mode == "embedded":
                client = connect(Path(tmp) / "embedded")
            else:
                host, port = stack.enter_context(ChromaServer(Path(tmp) / "server"))
                client = connect(host=host, port=port)
            results["modes"][mode] = _measure(
                client,
                paths,
                tokenizer,
                tokenizer_name,
                embedder,
                chunk_tokens,
                queries,
                k,
                seed,
                query_texts,
                progress,
            )
    return results


def _measure(
    client, paths, tokenizer, tokenizer_name, embedder, chunk_tokens, queries, k, seed, query_texts, progress
) -> dict[str, Any]:
    report = ingest(
        client, "bench", paths, tokenizer, tokenizer_name, embedder, chunk_tokens=chunk_tokens, progress=progress
    )
    if not query_texts:  # the same queries for every mode: the opening words of random chunks
        _, texts, _ = read_collection(get_collection(client, "bench"))
        rng = random.Random(seed)
        query_texts.extend(" ".join(t.split()[:12]) for t in rng.sample(texts, min(queries, len(texts))))
    retriever = ChromaRetriever("bench", client=client, embedding_model=embedder)
    vectors = [embedder.embed_query(q) for q in query_texts]
    collection = retriever.collection
    end_to_end: list[float] = []
    search_only: list[float] = []
    for text, vector in zip(query_texts, vectors, strict=True):
        started = time.perf_counter()
        retriever.retrieve(text, k)
        end_to_end.append(time.perf_counter() - started)
        started = time.perf_counter()
        collection.query(query_embeddings=[vector], n_results=k, include=["documents", "metadatas", "distances"])
        search_only.append(time.perf_counter() - started)
    return {
        "files": report.files_indexed,
        "chunks": report.chunks_total,
        "ingest_seconds": round(report.seconds, 2),
        "ingest_chunks_per_s": round(report.chunks_total / report.seconds, 1),
        "query_ms": _summary(end_to_end),
        "search_only_ms": _summary(search_only),
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(_percentile(ms, 0.5), 2),
        "p95": round(_percentile(ms, 0.95), 2),
        "mean": round(statistics.fmean(ms), 2),
    }


def write_outputs(results: dict[str, Any], out_dir: Path, stem: str = "store_bench") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2))
    modes = list(results["modes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(modes, [results["modes"][m]["ingest_chunks_per_s"] for m in modes], color=["#4c72b0", "#dd8452"])
    left.set_title("ingestion (chunk + embed + write)")
    left.set_ylabel("chunks / s")
    width = 0.2
    for i, (key, label) in enumerate((("query_ms", "query incl. embedding"), ("search_only_ms", "Chroma search"))):
        for j, stat in enumerate(("p50", "p95")):
            xs = [x + (2 * i + j - 1.5) * width for x in range(len(modes))]
            right.bar(xs, [results["modes"][m][key][stat] for m in modes], width, label=f"{label} {stat}")
    right.set_xticks(range(len(modes)), modes)
    right.set_ylabel("ms")
    right.set_title(f"query latency, k={results['k']}")
    right.legend(fontsize=7)
    chunks = results["modes"][modes[0]]["chunks"]
    fig.suptitle(
        f"Chroma store, {chunks} chunks of {results['chunk_tokens']} tokens ({results['embedding_model']})", fontsize=9
    )
    fig.tight_layout()
    png_path = out_dir / f"{stem}.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
