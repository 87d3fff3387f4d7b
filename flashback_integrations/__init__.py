"""FlashBack: retrieval-augmented generation that appends passages and keeps the KV cache."""

from .config import FlashBackConfig
from .data import sample_corpus_dir
from .engine.layout import MARK_L, MARK_R
from .errors import (
    AdapterMismatchError,
    ConfigError,
    ContextWindowError,
    FlashBackError,
    MarksUnavailableError,
    ModelResolutionError,
    RetrievalError,
)
from .events import (
    FinishEvent,
    FlashBackCallback,
    GenerationResult,
    Retrieval,
    RetrievalEvent,
    TokenEvent,
)
from .loading.adapter import AdapterManifest, add_mark_tokens, base_fingerprint, load_adapter, save_adapter
from .model import FlashBackModel
from .retrieval import BM25Retriever, Passage, Retriever

__all__ = [
    "MARK_L",
    "MARK_R",
    "AdapterManifest",
    "AdapterMismatchError",
    "BM25Retriever",
    "ConfigError",
    "ContextWindowError",
    "FinishEvent",
    "FlashBackCallback",
    "FlashBackConfig",
    "FlashBackError",
    "FlashBackModel",
    "GenerationResult",
    "MarksUnavailableError",
    "ModelResolutionError",
    "Passage",
    "Retrieval",
    "RetrievalError",
    "RetrievalEvent",
    "Retriever",
    "TokenEvent",
    "add_mark_tokens",
    "base_fingerprint",
    "load_adapter",
    "sample_corpus_dir",
    "save_adapter",
]
