"""Perplexity of the paper's rows on the same target tokens, with bootstrap confidence intervals.

Every row scores exactly the same examples (same source windows, passages and targets); rows
differ only in layout (none / prepend / append), marks, and adapter. A run writes its partial
results after each row, so a stopped run resumes at the next row.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..loading.devices import resolve_device
from .examples import Example
from .scoring import mark_id_list, pad_id_of, target_nll


@dataclass(frozen=True)
class PplRow:
    name: str
    layout: str
    adapter: str | None = None
    marks: bool = False
    adapter_layout: str | None = None
    """The layout the adapter was trained for, when the row scores it in another one on purpose."""
    tail_tokens: int = 1
    """isolated rows: history tokens that read the passages (docs/method.md's t)."""

    def __post_init__(self) -> None:
        if self.layout not in ("none", "append", "prepend", "isolated"):
            raise ConfigError(
                f"row {self.name!r}: layout must be none, append, prepend or isolated, got {self.layout!r}."
            )


def paper_rows(
    flashback_adapter: str | None,
    prepend_adapter: str | None,
    append_adapter: str | None,
    isolated_adapter: str | None = None,
) -> tuple[list[PplRow], list[str]]:
    """The paper's six rows and the isolated layout's; rows whose adapter is not given are returned by
    name as skipped."""
    rows = [
        PplRow("no retrieval", "none"),
        PplRow("prepend", "prepend"),
        PplRow("prepend + LoRA + MT", "prepend", prepend_adapter, True),
        PplRow("append", "append"),
        PplRow("append + LoRA", "append", append_adapter, False),
        PplRow("append + LoRA + MT (FlashBack)", "append", flashback_adapter, True),
        PplRow("isolated (untrained)", "isolated"),
        PplRow("isolated + prepend adapter", "isolated", prepend_adapter, True, adapter_layout="prepend"),
        PplRow("isolated + adapter", "isolated", isolated_adapter, True),
        PplRow("no retrieval + isolated adapter", "none", isolated_adapter, True, adapter_layout="isolated"),
    ]
    needs = {
        "prepend + LoRA + MT",
        "append + LoRA",
        "append + LoRA + MT (FlashBack)",
        "isolated + prepend adapter",
        "isolated + adapter",
        "no retrieval + isolated adapter",
    }
    kept = [r for r in rows if r.name not in needs or r.adapter]
    skipped = [r.name for r in rows if r.name in needs and not r.adapter]
    return kept, skipped


def row_key(row: PplRow) -> str:
    """A row's identity in a partial run: everything that changes its scores (``tail_tokens`` only when
    it is not 1, so runs saved before it existed still resume)."""
    fields = asdict(row)
    if fields["tail_tokens"] == 1:
        del fields["tail_tokens"]
    return json.dumps(fields, sort_keys=True)


def with_tail(rows: Sequence[PplRow], tail_tokens: int) -> list[PplRow]:
    """The isolated rows read by ``tail_tokens`` history tokens (named so, when not 1)."""
    if isinstance(tail_tokens, bool) or not isinstance(tail_tokens, int) or tail_tokens < 1:
        raise ConfigError(f"tail_tokens must be a positive integer, got {tail_tokens!r}.")
    if tail_tokens == 1:
        return list(rows)
    return [
        replace(r, name=f"{r.name} (tail {tail_tokens})", tail_tokens=tail_tokens) if r.layout == "isolated" else r
        for r in rows
    ]


def select_rows(
    model: str,
    flashback_adapter: str | None,
    prepend_adapter: str | None,
    append_adapter: str | None,
    isolated_adapter: str | None,
    names: Sequence[str] | None,
    tail_tokens: int = 1,
) -> tuple[list[PplRow], list[str]]:
    """The rows ``flashback eval ppl`` scores: the paper's and the isolated layout's (all, or those
    ``names``), and the names skipped for want of an adapter. ``"default"`` scores its shipped append
    adapter as FlashBack unless another is given."""
    from ..loading.shipped import shipped_adapter

    if flashback_adapter is None and model == "default" and shipped_adapter("append") is not None:
        flashback_adapter = str(shipped_adapter("append"))
    rows, skipped = paper_rows(flashback_adapter, prepend_adapter, append_adapter, isolated_adapter)
    if names:
        unknown = set(names) - {r.name for r in rows} - set(skipped)
        if unknown:
            raise ConfigError(f"Unknown row(s) {sorted(unknown)}; rows are {[r.name for r in rows] + skipped}.")
        rows = [r for r in rows if r.name in names]
        skipped = [name for name in skipped if name in names]
    return with_tail(rows, tail_tokens), skipped


def check_row_adapters(rows: Sequence[PplRow]) -> None:
    """Refuse a missing adapter, or one trained for another layout or mark setting, before anything is
    scored: the first would fail rows later, the others would score and compare the wrong things."""
    from ..loading.adapter import AdapterManifest, check_adapter_dir

    for row in rows:
        manifest = AdapterManifest.load(check_adapter_dir(row.adapter)) if row.adapter else None
        if manifest is None:
            continue
        mode, marks = manifest.flashback_config.get("mode"), manifest.flashback_config.get("marks")
        if marks is None and manifest.mark_token_ids:  # settings left open, but the marks were trained
            marks = True
        expected = row.adapter_layout or row.layout
        if mode is not None and mode != expected:
            raise ConfigError(
                f"row {row.name!r} needs an adapter trained for the {expected} layout but adapter {row.adapter} "
                f"was trained for {mode}; pass one from `flashback train --layout {expected}` "
                "(see its flashback_adapter.json)."
            )
        if marks is not None and bool(marks) != row.marks:
            raise ConfigError(
                f"row {row.name!r} is a {'marks' if row.marks else 'no-marks'} row but adapter {row.adapter} was "
                f"trained {'with' if marks else 'without'} marks; train it with "
                f"`flashback train {'--marks' if row.marks else '--no-marks'}`."
            )


def examples_digest(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.source, e.target_start, e.src[-8:], e.doc[:8], e.tgt]).encode())
    return digest.hexdigest()[:16]


def score_row(
    row: PplRow,
    examples: Sequence[Example],
    model_name: str = "default",
    device: str | None = None,
    batch_size: int = 32,
    progress: Any = None,
    scored: Sequence[float] = (),
    on_batch: Callable[[list[float]], None] | None = None,
) -> list[float]:
    """Per-example NLL sums (nats) of the targets under one row.

    ``scored`` holds the sums of a row's first examples from an interrupted run; scoring continues
    after them. ``on_batch`` receives the sums so far after every batch, so they can be saved.
    """
    from ..model import FlashBackModel

    device = str(resolve_device(device))
    check_row_adapters([row])
    fb = FlashBackModel.from_pretrained(model_name, adapter=row.adapter or "none", device=device, backend="torch")
    marks = fb.mark_ids if row.marks else None
    if row.marks and marks is None:
        raise ConfigError(f"row {row.name!r} uses marks but {row.adapter} gives the model none.")
    excluded = mark_id_list(fb.tokenizer, fb.model)
    pad = pad_id_of(fb.tokenizer)
    sums = list(scored)
    with torch.no_grad():
        for i in range(len(sums), len(examples), batch_size):
            batch = examples[i : i + batch_size]
            nll = target_nll(fb.model, batch, row.layout, marks, pad, excluded, tail_tokens=row.tail_tokens)
            sums.extend(nll.sum(-1).double().cpu().tolist())
            if progress is not None:
                progress(len(batch))
            if on_batch is not None:
                on_batch(sums)
    del fb
    return sums


def bootstrap(
    rows: dict[str, np.ndarray], tokens_per_example: int, n: int = 1000, seed: int = 0, reference: str | None = None
) -> dict[str, dict[str, float]]:
    """PPL and 95% percentile intervals, resampling whole targets (their tokens are correlated).

    With ``reference``, each row also gets the interval of its PPL ratio to the reference row,
    using the same resamples for both (a paired comparison).
    """
    names = list(rows)
    sums = np.stack([rows[k] for k in names])
    m = sums.shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m, size=(n, m))
    boot = np.exp(sums[:, idx].sum(-1) / (m * tokens_per_example))  # (rows, n)
    out = {}
    for r, name in enumerate(names):
        ppl = math.exp(sums[r].sum() / (m * tokens_per_example))
        lo, hi = np.percentile(boot[r], [2.5, 97.5])
        entry = {"ppl": ppl, "ci_low": float(lo), "ci_high": float(hi)}
        if reference is not None and reference in rows:
            ratio = boot[r] / boot[names.index(reference)]
            rlo, rhi = np.percentile(ratio, [2.5, 97.5])
            entry["ratio_to_reference"] = ppl / math.exp(sums[names.index(reference)].sum() / (m * tokens_per_example))
            entry["ratio_ci_low"], entry["ratio_ci_high"] = float(rlo), float(rhi)
        out[name] = entry
    return out


SAVE_EVERY_S = 30.0  # how much scoring a stopped `eval ppl` may lose


def run_eval(
    examples: Sequence[Example],
    rows: Sequence[PplRow],
    out_dir: str | Path,
    stem: str = "ppl",
    model_name: str = "default",
    device: str | None = None,
    batch_size: int = 32,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    merge_from: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Score all rows and write JSON, MD, PNG. ``{stem}.partial.json`` keeps finished rows and the
    row in progress (saved every ``SAVE_EVERY_S`` seconds), so a stopped run loses at most that.

    ``merge_from``: partial files of other runs on the same examples and model (rows scored in parallel
    by another process, under another stem); their finished rows, and any longer row in progress, are
    taken instead of being scored again. A file for other examples or another model is an error."""
    if not examples:
        raise ConfigError("No examples to score.")
    resolve_device(device)
    check_row_adapters(rows)
    n_tgt = len(examples[0].tgt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial_path = out / f"{stem}.partial.json"
    digest = examples_digest(examples)
    done: dict[str, Any] = {}
    started: dict[str, list[float]] = {}
    if partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved.get("examples_digest") == digest and saved.get("model") == model_name:
            done, started = saved["rows"], saved.get("in_progress", {})
    for other in merge_from:
        _merge_partial(Path(other), digest, model_name, done, started)

    def save(in_progress: dict[str, list[float]]) -> None:
        state = {"examples_digest": digest, "model": model_name, "rows": done, "in_progress": in_progress}
        tmp = partial_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(partial_path)  # atomic: a kill mid-write leaves the previous state

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows) * len(examples), desc="scoring", unit="ex")
    for row in rows:
        key = row_key(row)
        if key in done:
            if bar is not None:
                bar.update(len(examples))
            continue
        scored = started.get(key, [])[: len(examples)]
        if bar is not None:
            bar.set_description(f"scoring {row.name}")
            bar.update(len(scored))
        last_save = time.monotonic()

        def on_batch(sums: list[float], key: str = key) -> None:
            nonlocal last_save
            if time.monotonic() - last_save >= SAVE_EVERY_S:
                save({key: sums})
                last_save = time.monotonic()

        done[key] = score_row(
            row, examples, model_name, device, batch_size, bar.update if bar is not None else None, scored, on_batch
        )
        save({})
    if bar is not None:
        bar.close()
    arrays = {row.name: np.asarray(done[row_key(row)]) for row in rows}
    reference = next((r.name for r in rows if r.name.endswith("(FlashBack)")), None)
    stats = bootstrap(arrays, n_tgt, reference=reference)
    result = {
        "examples": len(examples),
        "scored_tokens": len(examples) * n_tgt,
        "examples_digest": digest,
        "model": model_name,
        "reference_row": reference,
        "rows": [{**asdict(row), **stats[row.name]} for row in rows],
        **(meta or {}),
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown_table(result))
    plot_ppl(result, out / f"{stem}.png")
    return result


def _merge_partial(
    path: Path, digest: str, model_name: str, done: dict[str, Any], started: dict[str, list[float]]
) -> None:
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the partial results {path}: {exc}") from exc
    if other.get("examples_digest") != digest or other.get("model") != model_name:
        raise ConfigError(
            f"{path} scored other examples or another model (digest {str(other.get('examples_digest'))[:8]}, model "
            f"{other.get('model')!r}; this run: {digest[:8]}, {model_name!r}): merge only runs of the same command."
        )
    for key, sums in (other.get("rows") or {}).items():
        done.setdefault(key, sums)
    for key, sums in (other.get("in_progress") or {}).items():
        if key not in done and len(sums) > len(started.get(key, [])):
            started[key] = sums


def markdown_table(result: dict[str, Any]) -> str:
    ref = result.get("reference_row")
    lines = [
        f"Token-level perplexity on {result['scored_tokens']:,} target tokens ({result['examples']:,} targets); "
        "95% bootstrap intervals over targets.",
        "",
        "| row | PPL | 95% CI | " + (f"ratio to {ref} (95% CI) |" if ref else ""),
        "|---|---:|---|" + ("---|" if ref else ""),
    ]
    for r in result["rows"]:
        line = f"| {r['name']} | {r['ppl']:.2f} | {r['ci_low']:.2f} - {r['ci_high']:.2f} |"
        if ref:
            line += f" {r['ratio_to_reference']:.3f} ({r['ratio_ci_low']:.3f} - {r['ratio_ci_high']:.3f}) |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_ppl(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    ppl = [r["ppl"] for r in rows]
    err = [[r["ppl"] - r["ci_low"] for r in rows], [r["ci_high"] - r["ppl"] for r in rows]]
    palette = {"none": "tab:gray", "prepend": "tab:blue", "append": "tab:orange", "isolated": "tab:green"}
    colors = [palette.get(r["layout"], "tab:orange") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.barh(names, ppl, xerr=err, color=colors, capsize=4)
    for bar, row in zip(bars, rows, strict=True):  # the value right of the interval's whisker, not on it
        ax.text(row["ci_high"], bar.get_y() + bar.get_height() / 2, f"  {row['ppl']:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(r["ci_high"] for r in rows) * 1.12)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (lower is better), 95% bootstrap CI")
    ax.set_title(f"{result['model']}: {result['scored_tokens']:,} target tokens", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
