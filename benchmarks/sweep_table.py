"""The validation table (and curves) of a folder of short training runs, one per setting: what each run
changed, its validation NLL at every evaluated step, its examples/s. Writes OUT.{json,md,png}.

    python benchmarks/sweep_table.py benchmarks/adapters/sweep-isolated benchmarks/results/val_sweep_isolated

A run that has not finished is listed with the steps it has done (from its newest checkpoint), so the table
can be looked at between sessions; the references (no retrieval, the teacher) come from
benchmarks/adapters/isolated-activated/val_references.json, the same 256 validation targets.
"""

import json
import sys
from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flashback_integrations.training.checkpoints import latest_checkpoint, load_training_state  # noqa: E402

REFERENCES = Path("benchmarks/adapters/isolated-activated/val_references.json")
SWEPT = ("lr", "mark_lr", "distill_weight", "tail_tokens", "lora_r")


def run_record(folder: Path) -> dict | None:
    """The run's settings and log: the final training log, or the newest checkpoint of an unfinished run."""
    log_file = folder / "training_log.json"
    if log_file.exists():
        saved = json.loads(log_file.read_text())
        return {"config": saved["record"]["train_config"], "log": saved["log"], "done": saved["record"]["steps_done"]}
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return None
    state, _ = load_training_state(checkpoint)
    return {"config": state["config"], "log": state["log"], "done": state["step"]}


def main(sweep: str, out: str) -> None:
    runs = {}
    for folder in sorted(p for p in Path(sweep).iterdir() if p.is_dir()):
        record = run_record(folder)
        if record is None:
            continue
        cfg, log = record["config"], record["log"]
        val = {e["step"]: e["val_loss"] for e in log if "val_loss" in e}
        # examples/s of the training steps alone: a step logged with a validation loss also timed the
        # validation, and the first step the step-0 one, so only steps that follow a step without one count
        timed = [e for e in log if "elapsed_s" in e]
        pairs = [(a, b) for a, b in pairwise(timed) if b["step"] == a["step"] + 1 and "val_loss" not in b]
        seconds = sum(b["elapsed_s"] - a["elapsed_s"] for a, b in pairs)
        rate = len(pairs) * cfg["batch_size"] / seconds if seconds > 0 else None
        runs[folder.name] = {
            "settings": {k: cfg.get(k) for k in SWEPT},
            "steps_done": record["done"],
            "steps": cfg["steps"],
            "val_loss": val,
            "examples_per_s": rate,
        }
    if not runs:
        raise SystemExit(f"no training runs under {sweep}")
    refs = json.loads(REFERENCES.read_text())["val_loss"] if REFERENCES.exists() else {}
    result = {"sweep": sweep, "references": refs, "runs": runs}
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))

    evaluated = sorted({s for r in runs.values() for s in r["val_loss"]})
    columns = " | ".join(f"val @{s}" for s in evaluated)
    head = f"| run | lr | mark lr | distill | LoRA r | steps | {columns} | ex/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    best = min(runs, key=lambda n: runs[n]["val_loss"].get(max(evaluated), float("inf")))
    for name, r in sorted(runs.items(), key=lambda kv: kv[1]["val_loss"].get(max(evaluated), float("inf"))):
        s = r["settings"]
        vals = " | ".join(f"{r['val_loss'][k]:.4f}" if k in r["val_loss"] else "–" for k in evaluated)
        rate = f"{r['examples_per_s']:.2f}" if r["examples_per_s"] else "–"
        label = f"**{name}**" if name == best else name
        lines.append(
            f"| {label} | {s['lr']:g} | {s['mark_lr'] or s['lr']:g} | {s['distill_weight']:g} | {s['lora_r']} | "
            f"{r['steps_done']}/{r['steps']} | {vals} | {rate} |"
        )
    if any(0 in r["val_loss"] for r in runs.values()) and not all(0 in r["val_loss"] for r in runs.values()):
        lines += ["", "A run without a val @0 skipped it (`--no-initial-eval`): all runs start as the same function."]
    references = "; ".join(f"{name} {value:.4f}" for name, value in refs.items())
    lines += ["", f"Validation NLL, nats per target token (lower is better). On the same targets: {references}."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    start = next((r["val_loss"][0] for r in runs.values() if 0 in r["val_loss"]), None)
    for name, r in runs.items():
        curve = {0: start, **r["val_loss"]} if start is not None else r["val_loss"]  # the shared start
        steps = sorted(curve)
        ax.plot(steps, [curve[k] for k in steps], marker="o", label=name)
    for name, value in refs.items():
        if name != "no retrieval":  # far above the runs; it would flatten the plot
            ax.axhline(value, ls="--", lw=0.8, color="grey")
            ax.annotate(name, (0, value), fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("optimizer step (16 examples)")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.set_title(Path(sweep).name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:3])
