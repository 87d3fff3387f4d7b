"""What and how the trainer trains: every setting declared once, with the help text the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import require_positive_ints, setting
from ..errors import ConfigError
from ..loading.devices import resolve_device


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
    initial_eval: bool = setting(
        True, "Validation loss before the first step (off: runs that share their start, e.g. a sweep, skip it)."
    )
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
    init_adapter: str | None = setting(
        None, "Start from this adapter (as the same function): its rank and target modules at most this run's."
    )
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


# --------------------------------------------------------------------------- training
