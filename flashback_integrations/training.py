"""The bundled trainer: LoRA + the two marking-token rows, on METHOD.md's examples.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import AdapterManifest, add_mark_tokens, base_fingerprint, save_adapter
from .config import FlashBackConfig, require_positive_ints
from .data import Example, ExampleSettings, example_ids, example_spans, summarize
from .devices import resolve_device
from .errors import ConfigError
from .layout import MarkIds, Span, find_mark_ids

# Attention and MLP projections per architecture (PEFT's "all-linear" minus the output head,
# spelled out so the choice is visible in the adapter config).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
CHECKPOINT_DIR = "checkpoints"
# Settings that do not change what is learned, so a resumed run may differ in them (e.g. a CPU run
# spread over sessions with a time budget each, or continued on another device).
RESUME_MAY_CHANGE = {"max_minutes", "device", "bf16", "eval_every", "save_every", "keep_checkpoints"}
LOG_NAME = "training_log.json"
PLOT_NAME = "loss.png"


@dataclass
class TrainConfig:
    """What and how to train. ``steps`` counts optimizer steps of ``batch_size`` examples, made of
    ``batch_size / micro_batch_size`` accumulated micro-batches."""

    layout: str = "append"
    marks: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    lr: float = 5e-4
    mark_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    steps: int = 500
    batch_size: int = 16
    micro_batch_size: int = 16
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    bf16: bool | None = None
    save_dtype: str = "bfloat16"
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("append", "prepend", "isolated"):
            raise ConfigError(f"layout must be 'append', 'prepend' or 'isolated', got {self.layout!r}.")
        require_positive_ints(
            self, ("lora_r", "lora_alpha", "steps", "batch_size", "micro_batch_size", "eval_every", "save_every")
        )
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}."
            )
        if not self.lr > 0 or (self.mark_lr is not None and not self.mark_lr > 0):
            raise ConfigError("learning rates must be > 0.")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("lora_dropout and warmup_ratio must be in [0, 1).")
        if self.device is not None:
            resolve_device(self.device)  # a typo or a missing GPU fails here, before the model loads
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}.")

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


# --------------------------------------------------------------------------- scoring (shared with eval)
def collate(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Left-pad so every target sits at the end; padding is masked and skipped by position ids."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


def collate_spans(
    contexts: Sequence[Sequence[Span]], pad_id: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Left-padded ids, the spans' own position ids and a 4D mask: a causal span attends to everything
    before it, an isolated one to itself (and its sink, the first text token) only."""
    width = max(sum(len(s.ids) for s in spans) for spans in contexts)
    n = len(contexts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    group = torch.full((n, width), -2, dtype=torch.long)  # -2 padding, -1 text, i >= 0 segment i
    sink_at = torch.full((n,), -1, dtype=torch.long)
    for row, spans in enumerate(contexts):
        at = width - sum(len(s.ids) for s in spans)
        for index, span in enumerate(spans):
            end = at + len(span.ids)
            input_ids[row, at:end] = torch.tensor(span.ids, dtype=torch.long)
            positions[row, at:end] = torch.arange(span.start, span.start + len(span.ids))
            group[row, at:end] = index if span.isolated else -1
            if not span.isolated and sink_at[row] < 0:
                sink_at[row] = at
            at = end
        if any(s.isolated and s.sink is not None for s in spans) and sink_at[row] < 0:
            raise ConfigError("a passage sink needs a text token in the same context")
    q = torch.arange(width)
    causal = q[None, :, None] >= q[None, None, :]
    gq, gk = group[:, :, None], group[:, None, :]
    text = (gq == -1) & (gk != -2) & causal
    own = (gq >= 0) & (gq == gk) & causal
    sinks = torch.tensor([any(s.isolated and s.sink is not None for s in spans) for spans in contexts])
    sink = (gq >= 0) & sinks[:, None, None] & (q[None, None, :] == sink_at[:, None, None])
    pad_self = (gq == -2) & (q[None, :, None] == q[None, None, :])  # no all-masked rows
    allowed = (text | own | sink | pad_self)[:, None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def target_nll(
    model: Any,
    examples: Sequence[Example],
    layout: str,
    marks: MarkIds | None,
    pad_id: int,
    excluded_ids: Sequence[int] = (),
    autocast: bool = False,
    tail_tokens: int = 1,
) -> torch.Tensor:
    """Negative log-likelihood of every target token, shape (examples, target_tokens).

    Only the last ``target_tokens + 1`` positions get logits; ``excluded_ids`` (the marks) are
    removed from the softmax.
    """
    n_tgt = len(examples[0].tgt)
    if any(len(e.tgt) != n_tgt for e in examples):
        raise ConfigError("All examples in a batch must have targets of the same length.")
    device = next(model.parameters()).device
    if layout == "isolated":
        batch = collate_spans([example_spans(e, marks, tail_tokens) for e in examples], pad_id, device)
    else:
        batch = collate([example_ids(e, layout, marks) for e in examples], pad_id, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch, logits_to_keep=n_tgt + 1, use_cache=False).logits[:, :-1].float()
    if excluded_ids:
        logits[..., list(excluded_ids)] = float("-inf")
    targets = torch.tensor([e.tgt for e in examples], device=device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(len(examples), n_tgt)


def pad_id_of(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def mark_id_list(tokenizer: Any, model: Any) -> list[int]:
    marks = find_mark_ids(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if marks is None or max(marks.left, marks.right) >= rows:
        return []
    return [marks.left, marks.right]


# --------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_val_loss: float | None
    log: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None


def default_target_modules(model: Any) -> list[str] | str:
    model_type = getattr(model.config, "model_type", "")
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


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


def _trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _latest_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINT_DIR
    found = sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if folder.is_dir() else []
    return found[-1] if found else None


def _hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def prepare_model(model: Any, tokenizer: Any, cfg: TrainConfig) -> tuple[Any, MarkIds | None]:
    """Add the marks (if asked) and wrap ``model`` with LoRA + trainable mark rows."""
    from peft import LoraConfig, get_peft_model

    if cfg.target_modules:  # checked before the marks change the model
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            projections = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in model.named_modules()
                    if getattr(m, "weight", None) is not None
                    and m.weight.dim() == 2
                    and not isinstance(m, torch.nn.Embedding)
                }
            )
            raise ConfigError(
                f"target modules {missing} match no module of this model; its projection layers are "
                f"{', '.join(projections)}."
            )
    marks = None
    if cfg.marks:
        left, right = add_mark_tokens(model, tokenizer)
        marks = MarkIds(left, right)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules or default_target_modules(model),
        trainable_token_indices=[marks.left, marks.right] if marks else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), marks


def evaluate_loss(
    model: Any, examples: Sequence[Example], cfg: TrainConfig, marks: MarkIds | None, pad_id: int, autocast: bool
) -> float:
    """Mean target-token NLL with the training layout (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    excluded = [marks.left, marks.right] if marks else []
    with torch.no_grad():
        for i in range(0, len(examples), cfg.micro_batch_size):
            nll = target_nll(
                model, examples[i : i + cfg.micro_batch_size], cfg.layout, marks, pad_id, excluded, autocast
            )
            total += float(nll.sum())
            count += nll.numel()
    if was_training:
        model.train()
    return total / max(count, 1)


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
) -> TrainResult:
    """Train the FlashBack adapter on ``model`` (modified in place: marks added, PEFT-wrapped) and
    write it to ``output_dir`` with its manifest, log and loss curve."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = cfg or TrainConfig()
    example_settings = example_settings or ExampleSettings()
    if not train_examples:
        raise ConfigError("No training examples; build them with `flashback data build` or pass --docs.")
    out = Path(output_dir)
    checkpoint = _latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint under {out / CHECKPOINT_DIR}; start without --resume.")
    if not resume and _latest_checkpoint(out) is not None:
        raise ConfigError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it or choose another output folder."
        )
    device = resolve_device(cfg.device)
    autocast = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    torch.manual_seed(cfg.seed)
    fingerprint = base_fingerprint(model)
    model.to(device)
    peft_model, marks = prepare_model(model, tokenizer, cfg)
    peft_model.to(device)
    pad_id = pad_id_of(tokenizer)
    excluded = [marks.left, marks.right] if marks else []
    params = _trainable(peft_model)
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
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        now = asdict(cfg)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and state["config"].get(k) != now[k])
        if changed:
            raise ConfigError(f"--resume with different settings than the checkpoint ({changed}); use the same ones.")
        for name, tensor in state["trainable"].items():
            params[name].data.copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, log, elapsed_before = state["step"], state["log"], state["elapsed_s"]

    def save_checkpoint() -> None:
        folder = out / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "config": asdict(cfg),
            "trainable": {n: p.detach().cpu().clone() for n, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "log": log,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
        }
        tmp = folder / f".step-{step}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / f"step-{step}.pt")
        for old in sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[: -cfg.keep_checkpoints]:
            old.unlink()

    started = time.perf_counter()
    stopped = None
    peft_model.train()
    if step == 0 and val_examples:
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
                nll = target_nll(
                    peft_model, [train_examples[i] for i in idx], cfg.layout, marks, pad_id, excluded, autocast
                )
                loss = nll.mean() / cfg.accumulation
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
        if step > 0 and not (out / CHECKPOINT_DIR / f"step-{step}.pt").is_file():
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
        top_k=example_settings.top_k,
        max_doc_tokens=example_settings.max_doc_tokens,
        marks=bool(marks),
    )
    training_record = {
        "train_config": asdict(cfg),
        "example_settings": asdict(example_settings),
        "train_data": {**summarize(train_examples), **(data_info or {})},
        "val_data": summarize(val_examples) if val_examples else None,
        "steps_done": step,
        "initial_val_loss": val_losses[0] if val_losses else None,
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
        extra={"training": training_record},
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
    params = _trainable(peft_model)
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
    fig, ax = plt.subplots(figsize=(7, 4))
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
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
