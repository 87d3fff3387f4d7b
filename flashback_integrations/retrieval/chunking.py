"""The one chunker: windows of the reader's tokens with character spans (so every chunk traces back to
its file), or of words where no tokenizer is at hand (BM25 over files)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int
    """Character offset of the chunk in the decoded file."""
    end: int
    text: str


def check_chunking(chunk_tokens: int, overlap: int = 0) -> None:
    if chunk_tokens <= 0:
        raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}.")
    if not 0 <= overlap < chunk_tokens:
        raise ConfigError(f"overlap must be in [0, chunk_tokens), got {overlap} with chunk_tokens={chunk_tokens}.")


def chunk_text(text: str, tokenizer: Any, chunk_tokens: int = 128, overlap: int = 0) -> list[Chunk]:
    """Cut ``text`` into windows of ``chunk_tokens`` tokens of ``tokenizer`` (``overlap`` shared)."""
    check_chunking(chunk_tokens, overlap)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [o for o in encoded["offset_mapping"] if o[1] > o[0]]
    chunks: list[Chunk] = []
    step = chunk_tokens - overlap
    for start_tok in range(0, len(offsets), step):
        window = offsets[start_tok : start_tok + chunk_tokens]
        start, end = window[0][0], window[-1][1]
        piece = text[start:end]
        if piece.strip():
            chunks.append(Chunk(index=len(chunks), start=start, end=end, text=piece))
        if start_tok + chunk_tokens >= len(offsets):
            break
    return chunks


def word_chunks(text: str, chunk_words: int) -> list[str]:
    """``text`` cut into pieces of ``chunk_words`` whitespace-separated words."""
    if chunk_words <= 0:
        raise ConfigError(f"chunk_words must be positive, got {chunk_words}.")
    words = text.split()
    return [" ".join(words[i : i + chunk_words]) for i in range(0, len(words), chunk_words)]
