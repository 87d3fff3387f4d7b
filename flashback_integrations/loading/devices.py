"""dtype and device names checked once, so a typo or a CPU-only torch fails with a message, not a traceback."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"float32"``/``"torch.bfloat16"``/a ``torch.dtype`` -> the dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda when available, else cpu; a CUDA device this torch cannot use is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device; use cpu or cuda (cuda:N).") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; use --device "
                "cpu, or install a CUDA build of torch on a machine with a GPU."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist.")
    return resolved


# Set by FlashBack itself (from its own arguments); in model_kwargs they would be ambiguous, and
# trust_remote_code there would slip past the explicit refusal. Matched case- and dash-insensitively.
_OWN_LOAD_ARGS = {
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "trust_remote_code": "trust_remote_code",
    "revision": "revision",
    "code_revision": "revision",
    "device": "device",
    "model_kwargs": "model_kwargs",
}
# Attention kernels that take the engine's explicit 4-D masks and position ids.
MASK_ATTENTION = ("eager", "sdpa")


def check_trust_remote_code(value: Any) -> bool:
    """Only a real ``True`` runs a repository's own code: ``"false"`` or ``1`` would be truthy."""
    if value is not True and value is not False:
        raise ConfigError(f"trust_remote_code must be True or False, got {value!r}.")
    return value


def check_model_kwargs(model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments, checked before anything loads (as ``HuggingFaceLLM``'s
    ``model_kwargs``): ``device_map``, ``quantization_config``, ``attn_implementation``, ...

    The one place every entry point (Python loader, CLI, framework classes) checks them: the loading
    arguments FlashBack sets itself are refused here, so none of them can override the explicit one."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise ConfigError(f"model_kwargs must be a dict of from_pretrained arguments, got {model_kwargs!r}.")
    nested = model_kwargs.get("model_kwargs")
    if isinstance(nested, dict):  # from_pretrained(..., model_kwargs={...}), HuggingFaceLLM's spelling
        both = set(nested) & set(model_kwargs)
        if both:
            raise ConfigError(f"{sorted(both)} given both inside and beside model_kwargs; give each once.")
        model_kwargs = {**{k: v for k, v in model_kwargs.items() if k != "model_kwargs"}, **nested}
        if not all(isinstance(k, str) for k in model_kwargs):
            raise ConfigError(f"model_kwargs must be a dict of from_pretrained arguments, got {nested!r}.")
    for key in model_kwargs:
        field = _OWN_LOAD_ARGS.get(key.strip().lower().replace("-", "_"))
        if field == "model_kwargs":
            raise ConfigError(f"model_kwargs cannot nest another {key!r}; give its entries directly.")
        if field is not None:
            raise ConfigError(f"pass {field}=... directly, not inside model_kwargs ({key!r} found there).")
        if key.startswith("_"):
            raise ConfigError(f"model_kwargs key {key!r} is a private from_pretrained argument; remove it.")
    if model_kwargs.get("device_map") is not None and importlib.util.find_spec("accelerate") is None:
        raise ConfigError("model_kwargs device_map needs the accelerate package: pip install accelerate.")
    attn = model_kwargs.get("attn_implementation")
    if attn is not None and attn not in MASK_ATTENTION:
        raise ConfigError(
            f"attn_implementation={attn!r} cannot take the per-token masks and positions FlashBack's layouts "
            f"need; use one of {', '.join(MASK_ATTENTION)}."
        )
    return dict(model_kwargs)


def auto_placement(
    dtype: torch.dtype | str | None, device: str | torch.device | None, device_map: Any = None
) -> tuple[torch.dtype, torch.device | None]:
    """What users of ``HuggingFaceLLM`` expect with nothing given: the GPU when there is one, in bf16
    (fp16 where bf16 is not supported), else the CPU in fp32. With ``device_map`` accelerate places
    the weights, so no device is returned."""
    if device_map is not None and device is not None:
        raise ConfigError("pass device or model_kwargs device_map, not both.")
    if device_map is not None:
        on_gpu, placed = torch.cuda.is_available(), None
    else:
        placed = resolve_device(device)
        on_gpu = placed.type == "cuda"
    if dtype is not None and str(dtype) != "auto":
        return resolve_dtype(dtype), placed
    if on_gpu:
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), placed
    return torch.float32, placed
