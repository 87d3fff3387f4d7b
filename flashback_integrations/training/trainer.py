"""The bundled trainer: LoRA + the two marking-token rows, on docs/method.md's examples.

Only PEFT's own mechanisms decide what trains: LoRA matrices on the chosen linear layers and,
with marks, PEFT trainable tokens for exactly the ``<MARK_L>``/``<MARK_R>`` rows (the base
embedding matrix stays frozen and bit-identical). The loss is on the target tokens only and the
marks are excluded from its softmax (they are never generated either).

Runs are resumable: a checkpoint holds the trainable weights, optimizer, scheduler and RNG state,
and the data order is a pure function of (seed, step), so ``resume=True`` continues exactly.
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import FlashBackConfig
from ..engine.activation import ACTIVATION_PASSAGE, activate
from ..errors import ConfigError
from ..loading.adapter import AdapterManifest, base_fingerprint, save_adapter
from ..loading.devices import resolve_device
from .checkpoints import (
    CHECKPOINT_DIR,
    check_output_dir,
    checkpoint_steps,
    latest_checkpoint,
    load_training_state,
    restore_state,
    save_training_state,
    trainable_params,
)
from .config import TrainConfig
from .examples import Example, ExampleSettings, summarize
from .scoring import Teacher, evaluate_loss, pad_id_of, training_loss
from .setup import init_from_adapter, prepare_model

# Settings that do not change what is learned, so a resumed run may differ in them (e.g. a CPU run
# spread over sessions with a time budget each, or continued on another device).
RESUME_MAY_CHANGE = {"max_minutes", "device", "bf16", "eval_every", "initial_eval", "save_every", "keep_checkpoints"}
LOG_NAME = "training_log.json"
PLOT_NAME = "loss.png"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_val_loss: float | None
    log: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None


def example_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of examples ``start .. start+count`` in a seeded epoch-by-epoch shuffle."""
    out = []
    cache: dict[int, list[int]] = {}
    for p in range(start, start + count):
        epoch = p // n
        if epoch not in cache:
            perm = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(perm)
            cache[epoch] = perm
        out.append(cache[epoch][p % n])
    return out


def _hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def train(
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[Example],
    output_dir: str | Path,
    cfg: TrainConfig | None = None,
    val_examples: Sequence[Example] = (),
    example_settings: ExampleSettings | None = None,
    base_model_name: str = "unknown",
    data_info: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    teacher: Teacher | None = None,
) -> TrainResult:
    """Train the FlashBack adapter on ``model`` (modified in place: marks added, PEFT-wrapped) and
    write it to ``output_dir`` with its manifest, log and loss curve.

    ``teacher`` (with ``cfg.distill_weight > 0``): a frozen model that reads the passage prepended with
    its own marks (e.g. the base with the prepend + LoRA + MT adapter merged); the student learns its
    top-``distill_top_k`` distribution at every target position (context distillation)."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = cfg or TrainConfig()
    example_settings = example_settings or ExampleSettings()
    if not train_examples:
        raise ConfigError("No training examples; build them with `flashback data build` or pass --docs.")
    out = Path(output_dir)
    check_output_dir(out)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint under {out / CHECKPOINT_DIR}; start without --resume.")
    if not resume and latest_checkpoint(out) is not None:
        raise ConfigError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it or choose another output folder."
        )
    device = resolve_device(cfg.device)
    autocast = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    torch.manual_seed(cfg.seed)
    if cfg.distill_weight > 0 and teacher is None:
        raise ConfigError("distill_weight > 0 needs a teacher model (the CLI: --teacher-adapter DIR).")
    fingerprint = base_fingerprint(model)
    model.to(device)
    peft_model, marks = prepare_model(model, tokenizer, cfg)
    peft_model.to(device)
    if cfg.init_adapter:
        init_from_adapter(peft_model, cfg.init_adapter)
    if cfg.activated and not activate(peft_model):
        raise ConfigError("activated=True found no LoRA layers to gate.")
    if teacher is not None:
        teacher.model.to(device).eval()
        teacher.model.requires_grad_(False)
    pad_id = pad_id_of(tokenizer)
    excluded = [marks.left, marks.right] if marks else []
    params = trainable_params(peft_model)
    lora_params = [p for n, p in params.items() if "lora_" in n]
    mark_params = [p for n, p in params.items() if "trainable_tokens" in n]
    if len(lora_params) + len(mark_params) != len(params):
        unexpected = [n for n in params if "lora_" not in n and "trainable_tokens" not in n]
        raise ConfigError(f"Unexpected trainable parameters {unexpected[:5]}; only LoRA and mark rows may train.")
    groups = [{"params": lora_params, "lr": cfg.lr}]
    if mark_params:
        groups.append({"params": mark_params, "lr": cfg.mark_lr or cfg.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    log: list[dict[str, Any]] = []
    step = 0
    elapsed_before = 0.0
    if checkpoint is not None:
        record, tensors = load_training_state(checkpoint)
        now = asdict(cfg)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and record["config"].get(k) != now[k])
        if changed:
            raise ConfigError(f"--resume with different settings than the checkpoint ({changed}); use the same ones.")
        restore_state(record, tensors, params, optimizer, scheduler)
        step, log, elapsed_before = record["step"], record["log"], record["elapsed_s"]

    def save_checkpoint() -> None:
        state = {
            "step": step,
            "config": asdict(cfg),
            "log": log,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "cuda_rng": device.type == "cuda",
        }
        save_training_state(out / CHECKPOINT_DIR / f"step-{step}", params, state, optimizer, scheduler)
        for old in checkpoint_steps(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)

    started = time.perf_counter()
    stopped = None
    peft_model.train()
    if step == 0 and val_examples and cfg.initial_eval:
        log.append({"step": 0, "val_loss": evaluate_loss(peft_model, val_examples, cfg, marks, pad_id, autocast)})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"training {cfg.layout}{'+marks' if marks else ''}", unit="step")
    try:
        while step < cfg.steps:
            order = example_order(len(train_examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for m in range(cfg.accumulation):
                idx = order[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
                batch = [train_examples[i] for i in idx]
                loss = training_loss(peft_model, batch, cfg, marks, pad_id, excluded, autocast, teacher)
                loss = loss / cfg.accumulation
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0))
            optimizer.step()
            scheduler.step()
            step += 1
            entry: dict[str, Any] = {
                "step": step,
                "loss": loss_sum,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
            }
            if val_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
                entry["val_loss"] = evaluate_loss(peft_model, val_examples, cfg, marks, pad_id, autocast)
            entry["elapsed_s"] = round(elapsed_before + time.perf_counter() - started, 2)
            log.append(entry)
            if on_step is not None:
                on_step(entry)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss_sum:.3f}", **({"val": f"{entry['val_loss']:.3f}"} if "val_loss" in entry else {})
                )
                bar.update(1)
            if step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint()
            if (
                cfg.max_minutes is not None
                and (time.perf_counter() - started) / 60 > cfg.max_minutes
                and step < cfg.steps
            ):
                stopped = f"time budget of {cfg.max_minutes} min reached at step {step} of {cfg.steps}"
                if val_examples and "val_loss" not in entry:
                    entry["val_loss"] = evaluate_loss(peft_model, val_examples, cfg, marks, pad_id, autocast)
                save_checkpoint()
                break
    except KeyboardInterrupt:
        # Ctrl-C: keep what the finished steps learned, so `--resume` continues from here.
        if step > 0 and not (out / CHECKPOINT_DIR / f"step-{step}").is_dir():
            save_checkpoint()
        if bar is not None:
            bar.close()
        raise
    if bar is not None:
        bar.close()

    val_losses = [e["val_loss"] for e in log if "val_loss" in e]
    final_val = val_losses[-1] if val_losses else None
    flashback_config = FlashBackConfig(
        mode=cfg.layout,
        stride=example_settings.target_tokens,
        query_tokens=example_settings.query_tokens,
        num_passages=example_settings.num_passages,
        max_doc_tokens=example_settings.max_doc_tokens,
        marks=bool(marks),
        **({"tail_tokens": cfg.tail_tokens} if cfg.layout == "isolated" else {}),
    )
    training_record = {
        "train_config": asdict(cfg),
        "example_settings": asdict(example_settings),
        "train_data": {**summarize(train_examples), **(data_info or {})},
        "val_data": summarize(val_examples) if val_examples else None,
        "steps_done": step,
        "initial_val_loss": next((e["val_loss"] for e in log if e["step"] == 0 and "val_loss" in e), None),
        "final_val_loss": final_val,
        "train_seconds": round(elapsed_before + time.perf_counter() - started, 1),
        "hardware": _hardware(device),
        "stopped_early": stopped,
    }
    manifest = AdapterManifest(
        base_model=base_model_name,
        base_fingerprint=fingerprint,
        flashback_config=flashback_config.to_dict(),
        mark_token_ids=[marks.left, marks.right] if marks else [],
        mark_tokens=["<MARK_L>", "<MARK_R>"] if marks else [],
        extra={"training": training_record, **({"activation": ACTIVATION_PASSAGE} if cfg.activated else {})},
    )
    _save_cast(peft_model, tokenizer, out, manifest, cfg.save_dtype)
    (out / LOG_NAME).write_text(json.dumps({"record": training_record, "log": log}, indent=1))
    plot_losses(
        log, out / PLOT_NAME, f"{base_model_name}: {cfg.layout}{' + marks' if marks else ''}, LoRA r={cfg.lora_r}"
    )
    if stopped is None and (out / CHECKPOINT_DIR).is_dir():
        shutil.rmtree(out / CHECKPOINT_DIR)
    return TrainResult(output_dir=out, steps=step, final_val_loss=final_val, log=log, stopped_early=stopped)


def _save_cast(peft_model: Any, tokenizer: Any, out: Path, manifest: AdapterManifest, dtype: str) -> None:
    """Save the trainable weights in ``dtype``; the in-memory model is rounded the same way, so it
    matches what loads back."""
    target = getattr(torch, dtype)
    params = trainable_params(peft_model)
    original = {n: p.dtype for n, p in params.items()}
    for p in params.values():
        p.data = p.data.to(target)
    try:
        save_adapter(peft_model, tokenizer, out, manifest, save_tokenizer=False)
    finally:
        for n, p in params.items():
            p.data = p.data.to(original[n])


def plot_losses(log: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        window = max(1, len(losses) // 30)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label=f"train (mean of {window})")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("target-token NLL (nats)")
    ax.set_title(textwrap.fill(title, 80), fontsize=10)  # base model names are long
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=9)  # below the axes: never over the curves
    fig.savefig(path, dpi=120)
    plt.close(fig)
