"""The context the model sees at each step: the docs/method.md layout table, in one place.

The engine, the trainer and the evaluation all build contexts with these functions, so the
layout that is trained is the layout that is served and scored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, RetrievalError
from ..retrieval.base import Passage

_SURROGATE = re.compile("[\ud800-\udfff]")
MARK_L = "<MARK_L>"
MARK_R = "<MARK_R>"


@dataclass(frozen=True)
class MarkIds:
    left: int
    right: int


def find_mark_ids(tokenizer: Any, rows: int | None = None) -> MarkIds | None:
    """The one answer to "which marks does this model have": the marking token ids when the tokenizer
    knows both marks (as whole tokens) and, given the model's vocabulary ``rows``, the model has them."""
    ids = []
    for mark in (MARK_L, MARK_R):
        token_id = tokenizer.convert_tokens_to_ids(mark)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != mark:
            return None
        ids.append(token_id)
    if rows is not None and max(ids) >= rows:
        return None
    return MarkIds(*ids)


def utf8_error(text: str) -> int | None:
    """Where ``text`` stops being encodable as UTF-8 (a lone surrogate, e.g. from bytes decoded with
    ``surrogateescape``), else None: tokenizers cannot read such text."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_utf8(text: str, what: str) -> None:
    at = utf8_error(text)
    if at is not None:
        raise ConfigError(
            f"{what} is not valid UTF-8 text: character {at} is a lone surrogate ({text[at]!r}), typically bytes "
            "of another encoding. Decode the input as UTF-8 (e.g. errors='replace') before passing it."
        )


def passage_text(text: str) -> str:
    """A passage as the reader gets it: a retrieved text that is not valid UTF-8 has each bad character
    replaced by U+FFFD, as ``bytes.decode(errors="replace")`` would; one bad byte in a store never stops
    a generation."""
    if utf8_error(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def _is_id(value: Any) -> bool:
    import numbers

    import torch

    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def prompt_ids(tokenizer: Any, prompt: Any, rows: int, marks: MarkIds | None) -> list[int]:
    """A prompt (text or ids) as ids, checked: text through :func:`encode_text` (marks stay text), ids inside
    the vocabulary ``[0, rows)`` and free of the marks; an empty prompt is the BOS token."""
    import torch

    if isinstance(prompt, str):
        check_utf8(prompt, "the prompt")
        ids = encode_text(tokenizer, prompt)
    elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
        ids = [int(i) for i in prompt] if all(_is_id(i) for i in prompt) else None
        if ids is None:
            raise ConfigError("prompt ids must be integers; pass a string or a list of token ids.")
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise ConfigError(f"prompt ids {bad[:5]} are outside this model's vocabulary [0, {rows}).")
        if marks is not None and (marks.left in ids or marks.right in ids):
            raise ConfigError(
                f"prompt ids contain the marking tokens {MARK_L}/{MARK_R} ({marks.left}, {marks.right}); they "
                "only bound retrieved passages. Remove them from the prompt."
            )
    else:
        raise ConfigError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}.")
    if not ids:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ConfigError(
                "The prompt is empty and this tokenizer has no BOS token to start from; give a non-empty prompt."
            )
        ids = [bos]
    return ids


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. BOS) when asked for special tokens."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for at in range(len(full) - len(bare) + 1):
        if full[at : at + len(bare)] == bare:
            return full[:at], full[at + len(bare) :]
    return [], []


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of user or passage text; the mark strings in it stay text, never the mark ids, so no
    prompt, message or document can open or close a passage block. Other special tokens (a chat
    template's own) are parsed as usual."""
    if (MARK_L not in text and MARK_R not in text) or find_mark_ids(tokenizer) is None:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    ids: list[int] = []
    for piece in re.split(f"({re.escape(MARK_L)}|{re.escape(MARK_R)})", text):
        if piece:
            literal = piece in (MARK_L, MARK_R)
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=literal)["input_ids"]
    if add_special_tokens:
        before, after = _special_frame(tokenizer)
        ids = [*before, *ids, *after]
    return ids


def _leading_tokens(tokenizer: Any, text: str, n: int, special: set[int]) -> list[int]:
    """The first ``n`` non-special tokens of ``text`` without tokenizing all of it: a multi-megabyte
    passage costs what its first ``n`` tokens cost. A growing prefix is tokenized until it yields a
    margin of tokens past ``n``, so the cut never falls inside the tokens kept."""
    margin = 16
    chars = 8 * (n + margin)
    while True:
        tokens = [t for t in encode_text(tokenizer, text[:chars], add_special_tokens=False) if t not in special]
        if chars >= len(text) or len(tokens) > n + margin:
            return tokens[:n]
        chars *= 4


def _each_passage_ids(tokenizer: Any, passages: Sequence[Passage], max_doc_tokens: int) -> list[list[int]]:
    special = set(tokenizer.all_special_ids)
    out: list[list[int]] = []
    for i, passage in enumerate(passages):
        if passage.token_ids is not None:
            tokens = list(passage.token_ids)
            rows = len(tokenizer)
            bad = [t for t in tokens if t >= rows]
            if bad:
                raise RetrievalError(
                    f"passage {i}: token_ids {bad[:5]} are outside the reader's vocabulary [0, {rows}); "
                    "token_ids must come from this model's tokenizer (or leave them out to tokenize the text)."
                )
        else:
            tokens = _leading_tokens(tokenizer, passage_text(passage.text), max_doc_tokens, special)
        out.append([t for t in tokens if t not in special][:max_doc_tokens])
    return out


def passage_ids(tokenizer: Any, passages: Sequence[Passage], max_doc_tokens: int) -> list[int]:
    """Each passage's tokens without special tokens, cut to ``max_doc_tokens``, concatenated."""
    return [t for ids in _each_passage_ids(tokenizer, passages, max_doc_tokens) for t in ids]


def passage_segments(
    tokenizer: Any, passages: Sequence[Passage], max_doc_tokens: int, marks: MarkIds | None
) -> list[list[int]]:
    """The isolated layout's segments: each passage on its own, wrapped by the marks; empty ones dropped."""
    return [wrap_block(ids, marks) for ids in _each_passage_ids(tokenizer, passages, max_doc_tokens) if ids]


def wrap_block(doc_ids: Sequence[int], marks: MarkIds | None) -> list[int]:
    """Bound a non-empty block with the marks; an empty retrieval leaves no block at all."""
    if not doc_ids:
        return []
    if marks is None:
        return list(doc_ids)
    return [marks.left, *doc_ids, marks.right]


def build_context(
    mode: str,
    prompt_ids: Sequence[int],
    generated: Sequence[int],
    block_step: int,
    block: Sequence[int],
    bos_id: int | None,
    block_offset: int = 0,
) -> list[int]:
    """Ids of the context that predicts the next token (docs/method.md, "Context layout").

    ``block`` is already wrapped by :func:`wrap_block`; ``block_step`` is ``j``, the number of
    generated tokens when it was retrieved. ``block_offset`` (append) puts the block that many
    tokens back into the history ``P + G[:j]`` (at its start when the history is shorter).
    """
    if mode == "none" or not block:
        return [*prompt_ids, *generated]
    if mode == "append":
        history = [*prompt_ids, *generated[:block_step]]
        cut = max(0, len(history) - block_offset)
        return [*history[:cut], *block, *history[cut:], *generated[block_step:]]
    if mode == "prepend":
        if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id:
            return [bos_id, *block, *prompt_ids[1:], *generated]
        return [*block, *prompt_ids, *generated]
    raise ValueError(f"unknown mode {mode!r}")


@dataclass(frozen=True)
class Span:
    """Ids at consecutive RoPE positions from ``start``, one piece of a context as the cache holds it.

    A causal span attends to everything before it in the cache; an ``isolated`` one only to itself
    (and to the text token ``sink`` at position 0, when given), so its KV depends on nothing else.
    """

    ids: tuple[int, ...]
    start: int = 0
    isolated: bool = False
    sink: int | None = None


def build_spans(
    mode: str,
    prompt_ids: Sequence[int],
    generated: Sequence[int],
    block_step: int,
    blocks: Sequence[Sequence[int]],
    bos_id: int | None,
    *,
    tail_tokens: int = 1,
    passage_sink: bool = False,
    block_offset: int = 0,
) -> list[Span]:
    """The context as spans (docs/method.md): one causal span for none/append/prepend, and for
    ``isolated`` the head ``H[:-t]``, the passage segments at negative positions ending at -1, and the
    tail ``H[-t:] + G[j:]`` continuing the head's positions (``H = P + G[:j]``).

    ``blocks`` holds the one wrapped block of append/prepend, or the wrapped segments of isolated.
    """
    if mode != "isolated":
        block = blocks[0] if blocks else []
        return [Span(tuple(build_context(mode, prompt_ids, generated, block_step, block, bos_id, block_offset)))]
    if not blocks:
        return [Span((*prompt_ids, *generated))]
    history = [*prompt_ids, *generated[:block_step]]
    cut = max(0, len(history) - tail_tokens)
    spans = [Span(tuple(history[:cut]))] if cut else []
    position = -sum(len(b) for b in blocks)
    sink = history[0] if passage_sink else None
    for block in blocks:
        spans.append(Span(tuple(block), position, True, sink))
        position += len(block)
    spans.append(Span((*history[cut:], *generated[block_step:]), cut))
    return spans


def query_ids(prompt_ids: Sequence[int], generated: Sequence[int], query_tokens: int) -> list[int]:
    """The last ``l`` tokens of ``P + G[:j]``: the ids whose text is the retrieval query."""
    history = [*prompt_ids, *generated]
    return history[-query_tokens:]


def block_budget(num_passages: int, max_doc_tokens: int, marks: bool) -> int:
    """The most tokens one retrieval block can add to the context."""
    return num_passages * max_doc_tokens + (2 if marks else 0)
