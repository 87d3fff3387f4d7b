"""Time to first token over a multi-turn chat that re-sends its whole history every turn.

Each backend runs the same conversation (the default model's chat template, random words as messages, a
fresh random passage each retrieval) and reports, per turn, the time to the first streamed token when the
backend may reuse what earlier calls left behind ("warm"), and for the last turn the same prompt on an
empty cache ("cold"). The torch backend's reuse is its context pool; llama.cpp and the server keep theirs.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import FlashBackConfig
from ..events import TokenEvent
from ..retrieval.base import Passage
from .models import load_model, random_id_source


def first_token_s(fb: Any, ids: list[int], retriever: Any, config: FlashBackConfig, answer: int) -> tuple[float, list]:
    """Seconds to the first generated token, and the answer's ids."""
    started = time.perf_counter()
    first = None
    tokens: list[int] = []
    for event in fb.stream(ids, retriever, config=config, max_new_tokens=answer, ignore_eos=True):
        if isinstance(event, TokenEvent):
            first = first if first is not None else time.perf_counter() - started
            tokens.append(event.token_id)
    assert first is not None
    return first, tokens


def forget(fb: Any) -> None:
    """An empty cache for the cold call: the pool cleared, llama.cpp's sequence dropped, the server's slot
    filled with an unrelated prompt."""
    backend = fb.backend
    if hasattr(backend, "pool"):
        backend.pool.clear()
    elif hasattr(backend, "forget"):
        backend.forget()  # llama.cpp: every sequence emptied
    else:
        random_ids = random_id_source(fb, 99)
        fb.generate(random_ids(64), max_new_tokens=1, ignore_eos=True, config=FlashBackConfig(mode="none"))


def run_turns(
    model: str,
    backend: str,
    mode: str,
    turns: int,
    message_tokens: int,
    answer_tokens: int,
    dtype: str,
    seed: int,
    gguf_dtype: str | None = None,
) -> dict[str, Any]:
    if backend == "vllm":  # its prefix cache keeps every block until memory runs out: no cold call to compare with
        raise ValueError("bench turns times torch, llamacpp and openai (llama-server); vLLM keeps the earlier turns.")
    fb = load_model(model, dtype, "cpu", backend, gguf_dtype)
    random_ids = random_id_source(fb, seed)
    config = FlashBackConfig(mode=mode, stride=16, num_passages=1, max_doc_tokens=64, query_tokens=32, marks=None)

    def retriever(query: str, k: int) -> list[Passage]:
        return [Passage(text="", token_ids=tuple(random_ids(64)))]

    use = retriever if mode != "none" else None
    tok = fb.tokenizer
    messages: list[dict[str, str]] = [{"role": "system", "content": "You answer questions about Python."}]
    rows = []
    ids: list[int] = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": tok.decode(random_ids(message_tokens))})
        ids = fb.chat_ids(messages)
        seconds, answer = first_token_s(fb, ids, use, config, answer_tokens)
        rows.append({"turn": turn, "prompt_tokens": len(ids), "ttft_s": round(seconds, 4)})
        messages.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)})
    forget(fb)
    cold, _ = first_token_s(fb, ids, use, config, answer_tokens)
    last = rows[-1]["ttft_s"]
    return {
        "model": model, "backend": backend, "mode": mode, "dtype": dtype, "gguf_dtype": gguf_dtype, "turns": rows,
        "last_turn_cold_ttft_s": round(cold, 4), "last_turn_warm_over_cold": round(last / cold, 3),
    }  # fmt: skip


def plot_turns(results: list[dict[str, Any]], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models import finish_plot

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        turns = [row["turn"] for row in r["turns"]]
        line = ax.plot(turns, [row["ttft_s"] for row in r["turns"]], marker="o", label=f"{r['backend']} ({r['mode']})")
        ax.plot([turns[-1]], [r["last_turn_cold_ttft_s"]], marker="x", markersize=10, color=line[0].get_color())
    ax.set_yscale("log")
    finish_plot(fig, ax, "turn (x: the last turn on an empty cache)", "time to first token, s", title, path)
