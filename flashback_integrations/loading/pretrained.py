"""Where ``FlashBackModel.from_pretrained`` and ``.shared`` get their parts: the backend chosen, the weights,
tokenizer and adapter loaded, and the saved settings merged with the caller's in one place."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import FlashBackConfig
from ..errors import ConfigError
from .adapter import load_adapter
from .devices import auto_placement, check_model_kwargs, check_trust_remote_code
from .resolve import exported_config, load_pretrained, resolve_model
from .shipped import choose_adapter

logger = logging.getLogger("flashback_integrations")


def with_saved(config: FlashBackConfig | None, saved: FlashBackConfig | None) -> FlashBackConfig | None:
    """A call's settings over what an adapter or export recorded: its layout and tail unless chosen."""
    if config is None or saved is None:
        return config or saved
    if config.mode is None:
        config = config.replace(mode=saved.mode)
    return config if config.tail_tokens is not None else config.replace(tail_tokens=saved.tail_tokens)


def load_parts(
    name_or_path: str,
    adapter: str | Path | bool | None,
    config: FlashBackConfig | None,
    dtype: Any,
    device: Any,
    merge_adapter: bool,
    check_adapter_base: bool,
    revision: str | None,
    trust_remote_code: bool,
    backend: str,
    where: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """``FlashBackModel``'s constructor arguments for ``from_pretrained``'s call (its docstring says what each
    argument does). ``where``: ``gguf``, ``server_url``, ``served_model`` for the other backends."""
    check_trust_remote_code(trust_remote_code)
    model_kwargs = check_model_kwargs(model_kwargs)
    mode = config.mode if config is not None else None
    if backend == "auto":
        from .backends import AUTO_REASONS, auto_backend

        if name_or_path == "default" and adapter is None:  # the shipped adapter the config asks for, or none
            adapter = choose_adapter(name_or_path, None, config) or "none"
        backend = auto_backend(name_or_path, adapter, dtype, device, model_kwargs, mode)
        logger.info("%s: backend=%s (auto: %s)", name_or_path, backend, AUTO_REASONS[backend])
    if backend != "torch":
        from .backends import load_backend

        if model_kwargs or trust_remote_code:
            raise ConfigError(
                f"model_kwargs and trust_remote_code are torch from_pretrained arguments; backend={backend!r} "
                "loads no transformers model. Drop them."
            )
        return backend_parts(load_backend(name_or_path, adapter, backend, **where, mode=mode), config)
    dtype, device = auto_placement(dtype, device, model_kwargs.get("device_map"))
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ConfigError(f"revision must be a branch, tag or commit name, got {revision!r}.")
    adapter = choose_adapter(name_or_path, adapter, config)
    source = resolve_model(name_or_path)
    hub = {"revision": revision} if revision is not None else {}
    tokenizer = load_pretrained(source, "tokenizer", trust_remote_code=trust_remote_code, **hub)
    model = load_pretrained(source, "model", trust_remote_code=trust_remote_code, dtype=dtype, **hub, **model_kwargs)
    if device is not None and model_kwargs.get("device_map") is None and not getattr(model, "is_quantized", False):
        model.to(device)
    manifest = None
    if adapter is not None:
        model, tokenizer, manifest = load_adapter(
            model, tokenizer, adapter, merge=merge_adapter, check_base=check_adapter_base
        )
    # the adapter's settings, or those a `flashback export` folder records (its adapter merged)
    saved = manifest.flashback_config if manifest is not None else exported_config(source)
    saved_config = FlashBackConfig.from_dict(saved) if saved else None
    return {
        "model": model,
        "tokenizer": tokenizer,
        "config": with_saved(config, saved_config),
        "name": name_or_path,
        "adapter_manifest": manifest,
    }


def backend_parts(loaded: dict[str, Any], config: FlashBackConfig | None) -> dict[str, Any]:
    """Constructor arguments from a llama.cpp or server load (``loading.backends``): no torch model."""
    return {"model": None, **loaded, "config": with_saved(config, loaded.get("config"))}


MAX_SHARED_MODELS = 4
"""Models ``FlashBackModel.shared`` keeps loaded (least recently used out first); a caller holding one keeps it."""
_SHARED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_SHARED_LOCK = threading.Lock()


def shared_model(
    load: Callable[..., Any],
    name_or_path: str,
    adapter: str | Path | bool | None,
    dtype: Any,
    device: Any,
    mode: str | None,
    revision: str | None,
    trust_remote_code: bool,
    backend: str,
    model_kwargs: dict[str, Any],
) -> Any:
    """One loaded model per (model, adapter, loading arguments) in this process, ``load`` making it once."""
    check_trust_remote_code(trust_remote_code)
    model_kwargs = check_model_kwargs(model_kwargs)
    dtype, placed = auto_placement(dtype, device, model_kwargs.get("device_map"))
    chosen = choose_adapter(name_or_path, adapter, FlashBackConfig(mode=mode) if mode else None)
    loading = (str(dtype), str(placed), revision, bool(trust_remote_code), backend)
    key = (name_or_path, str(chosen) if chosen else None, *loading, repr(sorted(model_kwargs.items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load(
                name_or_path,
                adapter=chosen or "none",
                dtype=dtype,
                device=placed,
                revision=revision,
                trust_remote_code=trust_remote_code,
                backend=backend,
                **model_kwargs,
            )
        _SHARED.move_to_end(key)
        while len(_SHARED) > MAX_SHARED_MODELS:
            _SHARED.popitem(last=False)
        return _SHARED[key]
