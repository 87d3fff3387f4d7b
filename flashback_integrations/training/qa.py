"""Question answering as a chain user measures it: a QA set built from documentation with known answers, and
answers scored by exact match, contains-answer and token F1 with bootstrap intervals.

The Python set: every ``.. function::`` of the library reference whose description does not name the function
becomes "In Python's MODULE module, which function is described as: ...?" with the function's name as the
answer. The description is the passage a retriever should find; the question quotes its first sentence with the
reST markup removed (so the text is not the stored passage verbatim) and never contains the answer."""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

_DIRECTIVE = re.compile(r"^\.\. function:: ([A-Za-z_][\w.]*)\(")
_MODULE = re.compile(r"^\.\. (?:module|currentmodule):: ([\w.]+)")
_OPTION = re.compile(r"^:[\w-]+:(\s|$)")
_ROLE = re.compile(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: list[str]
    source: str
    """The document (relative path) the answer's passage comes from."""


def _plain(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"\*+([^*]+)\*+", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _first_sentence(lines: Sequence[str]) -> str:
    paragraph: list[str] = []
    for line in lines:
        if not line.strip():
            if paragraph:
                break
            continue
        if line.strip().startswith("..") or _OPTION.match(line.strip()):  # nested directives, directive options
            if paragraph:
                break
            continue
        paragraph.append(line.strip())
    text = _plain(" ".join(paragraph))
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text).strip()


def python_function_questions(docs: Path) -> list[QAItem]:
    """Every usable ``.. function::`` of ``docs/library`` (the Python docs' reST sources), in file order."""
    library = docs / "library" if (docs / "library").is_dir() else docs
    items: list[QAItem] = []
    for path in sorted(library.glob("*.rst*")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        module = None
        for i, line in enumerate(lines):
            if m := _MODULE.match(line):
                module = m.group(1)
            m = _DIRECTIVE.match(line)
            if not m or module is None:
                continue
            name = m.group(1).rsplit(".", 1)[-1]
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) and lines[j].strip().endswith(("\\", ")"))):
                j += 1  # the signature's continuation lines
            sentence = _first_sentence(lines[j : j + 40])
            words = sentence.split()
            if len(words) < 6 or len(words) > 45 or re.search(rf"\b{re.escape(name)}\b", sentence):
                continue
            question = (
                f'In Python\'s {module} module, which function is described as: "{sentence}"? Answer with its name.'
            )
            items.append(QAItem(f"{module}.{name}", question, [name, f"{module}.{name}"], str(path.relative_to(docs))))
    seen: set[str] = set()
    unique = [q for q in items if not (q.id in seen or seen.add(q.id))]  # type: ignore[func-returns-value]
    return unique


def sample(items: Sequence[QAItem], n: int | None, seed: int) -> list[QAItem]:
    if n is None or n >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in picked]


def write_jsonl(items: Sequence[QAItem], path: Path) -> str:
    """Write the set; returns its sha256 (recorded beside it, so a rebuild can be checked)."""
    text = "".join(json.dumps(asdict(q), ensure_ascii=False) + "\n" for q in items)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def read_jsonl(path: Path) -> list[QAItem]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(QAItem(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            from ..errors import ConfigError

            raise ConfigError(f"{path}:{n} is not a QA item ({{id, question, answers, source}}): {exc}") from exc
    return items


# ----------------------------------------------------------------------------- scoring
def _tokens(text: str) -> list[str]:
    table = str.maketrans({c: " " for c in string.punctuation if c != "_"})
    return text.lower().translate(table).split()


def first_line(answer: str) -> str:
    return next((line for line in answer.strip().splitlines() if line.strip()), "")


def scores(answer: str, gold: Sequence[str]) -> dict[str, float]:
    """Exact match (the first line is the answer, punctuation and case aside), contains-answer (the answer as a
    word anywhere) and token F1 of the first line, each the best over the gold answers."""
    line = _tokens(first_line(answer))
    words = set(_tokens(answer))
    text = " ".join(_tokens(answer))
    em = contains = f1 = 0.0
    for g in gold:
        gt = _tokens(g)
        em = max(em, float(line == gt))
        contains = max(contains, float(f" {' '.join(gt)} " in f" {text} " or (len(gt) == 1 and gt[0] in words)))
        common = sum(min(line.count(t), gt.count(t)) for t in set(gt))
        if common:
            p, r = common / len(line), common / len(gt)
            f1 = max(f1, 2 * p * r / (p + r))
    return {"exact_match": em, "contains": contains, "f1": f1}


def interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean and 95% bootstrap interval over questions."""
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    return {
        "mean": float(arr.mean()),
        "low": float(np.quantile(means, 0.025)),
        "high": float(np.quantile(means, 0.975)),
    }


def summarise(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for label, answers in rows.items():
        out[label] = {
            metric: interval([a[metric] for a in answers]) for metric in ("exact_match", "contains", "f1")
        } | {
            "seconds_per_answer": float(np.mean([a["seconds"] for a in answers])),
            "retrievals_per_answer": float(np.mean([a["retrievals"] for a in answers])),
            "questions": len(answers),
        }
    return out


# ----------------------------------------------------------------------------- running
ROWS: dict[str, dict[str, Any]] = {
    "closed book": {"mode": "none"},
    "stuffed (the question's top-1 in the prompt)": {"mode": "none", "question_passages": 1},
    "FlashBack isolated alone": {"question_passages": 0},
    "isolated + stuffed (chat default)": {"question_passages": 1},
    "prepend every s": {"mode": "prepend", "question_passages": 0},
    "append (paper layout, its adapter)": {"mode": "append", "question_passages": 0},
}
"""The rows, as ``FlashBackConfig`` changes over the run's settings."""


def answer_one(fb: Any, item: QAItem, retriever: Any, config: Any, max_new_tokens: int) -> dict[str, Any]:
    """One answer the way a chat model gives it (the chat template, the question's passages in the user turn)."""
    import time

    from ..chat import prepare_chat

    started = time.perf_counter()
    call = prepare_chat(fb, [{"role": "user", "content": item.question}], retriever=retriever, config=config)
    result = fb.generate(
        call.prompt_ids, retriever if config.retrieves else None, config=config.replace(question_passages=0),
        max_new_tokens=max_new_tokens, first_query=call.first_query,
    )  # fmt: skip
    return {
        "id": item.id,
        "answer": result.text,
        **scores(result.text, item.answers),
        "seconds": time.perf_counter() - started,
        "retrievals": len(result.retrievals) + (call.question is not None),
        "tokens_fed": result.forward_tokens,
        "mode": result.mode,
        "backend": result.backend,
    }
