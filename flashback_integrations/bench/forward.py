"""What one forward costs at length T (a decode step, append's re-feed, prepend's recompute, an isolated
retrieval warm and cold), and the ``bench speed`` runs these costs predict."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .models import finish_plot, plan_lengths, random_id_source


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
    from ``refeed/decode`` and ``recompute/decode`` on the machine at hand: this is docs/method.md's cost
    model with measured, not counted, costs.
    """
    import torch

    from ..engine.kv import KVContext

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

    from ..engine.kv import KVContext
    from ..engine.layout import Span
    from ..engine.passages import PassageKVCache

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
                    m: round(v / 1000, 4) for m, v in (("prepend", prepend), ("append", append), ("none", none))
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
    finish_plot(fig, ax, "context length T (tokens)", "ms per forward (median)", title, path)
