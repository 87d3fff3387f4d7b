"""The small bundled corpus (notes on the Python standard library) used by the demo and the examples."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_corpus_dir() -> Path:
    return Path(str(resources.files("flashback_integrations") / "data" / "sample_corpus"))
