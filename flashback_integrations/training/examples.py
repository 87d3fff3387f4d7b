"""Training and evaluation examples: docs/method.md's target windows with a retrieved passage each.

An example is stored as token ids (source window, retrieved passage, target), not as a layout:
the same examples give the append and prepend layouts, with or without marks
(:func:`example_ids`), so every perplexity row and every trained adapter sees exactly the same
targets. Example sets are saved as gzip JSON lines, so they can be built once on a CPU (retrieval)
and carried to a GPU machine for training or scoring.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import rename_legacy, require_positive_ints, setting
from ..engine.layout import MarkIds, Span, build_context, build_spans, wrap_block
from ..errors import ConfigError, RetrievalError
from ..retrieval import BM25Retriever, Passage
from ..retrieval.chunking import chunk_text
from ..retrieval.files import iter_files, read_text
from ..store.chroma import StoreLocation

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Document:
    """A tokenised text; ``source`` is what retrieval exclusion compares against."""

    source: str
    ids: list[int]
    text: str = field(default="", repr=False)


@dataclass
class Example:
    source: str
    """The document the target comes from; its chunks are never retrieved for this example."""
    target_start: int
    src: list[int]
    doc: list[int]
    tgt: list[int]
    query: str = ""
    passage_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExampleSettings:
    """docs/method.md's windows: targets of ``target_tokens`` every ``target_every`` tokens from
    ``first_target``, the query from the ``query_tokens`` before, ``num_passages`` passages cut to
    ``max_doc_tokens``, and ``|src| + |doc|`` drawn uniformly in ``[min_window, context_budget -
    target_tokens - 2]`` so the example fits ``context_budget`` positions with both marks."""

    context_budget: int = setting(512, "Positions an example may use (docs/method.md: 512).")
    target_tokens: int = setting(16, "Target length s (= the retrieval stride).")
    target_every: int = setting(16, "A target every N tokens of a document.")
    first_target: int = setting(512, "First target position in a document.")
    query_tokens: int = setting(32, "Query = the l tokens before the target.")
    num_passages: int = setting(1, "Passages per target.")
    max_doc_tokens: int = setting(128, "Tokens kept of each passage.")
    # Help texts are rich markup: a literal "[" must be escaped or the bracketed text vanishes.
    min_window: int = setting(256, r"|src| + |doc| is drawn from \[min-window, budget - s - 2].")

    def __post_init__(self) -> None:
        require_positive_ints(self, tuple(asdict(self)))
        if self.max_window < self.min_window:
            raise ConfigError(
                f"context_budget={self.context_budget} leaves a window of {self.max_window} tokens, below "
                f"min_window={self.min_window}; raise the budget or lower min_window."
            )
        if self.num_passages * self.max_doc_tokens >= self.max_window:
            raise ConfigError(
                f"num_passages * max_doc_tokens = {self.num_passages * self.max_doc_tokens} leaves no room for "
                "source tokens "
                f"in a window of {self.max_window}; lower max_doc_tokens or num_passages."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExampleSettings:
        """From an example file's header (older files say ``top_k`` for ``num_passages``)."""
        return cls(**rename_legacy(dict(data)))

    @property
    def max_window(self) -> int:
        return self.context_budget - self.target_tokens - 2


def load_documents(
    paths: Iterable[str | Path], tokenizer: Any, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[Document]:
    """Tokenise text files (no special tokens); ``source`` is the resolved path, as in the store."""
    docs = []
    for f in iter_files(paths, include=include, exclude=exclude):
        text, _ = read_text(f)
        if text is None:  # binary or empty
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            docs.append(Document(source=str(f.resolve()), ids=list(ids), text=text))
    return docs


def split_documents(docs: Sequence[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """A seeded split of whole documents (train, validation): no document is on both sides."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}.")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = round(len(docs) * fraction)
    if fraction > 0 and n_val == 0 and len(docs) > 1:
        n_val = 1
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


class ExcludingRetriever:
    """Wraps ``retrieve(query, k)`` so no passage of the excluded source comes back.

    Passages name their document in ``metadata["source"]``. It asks for more than ``k`` and
    filters, asking again for more while the filter leaves fewer than ``k``; the filter is the
    guarantee, the over-fetch only keeps ``k`` results when they exist.
    """

    def __init__(
        self,
        retrieve: Callable[[str, int], Sequence[Passage]],
        overfetch: int = 8,
        max_fetch: int = 512,
        always_exclude: Iterable[str] = (),
    ):
        self._retrieve = retrieve
        self.overfetch = overfetch
        self.max_fetch = max_fetch
        self.always_exclude = frozenset(always_exclude)

    def __call__(self, query: str, k: int, exclude_source: str) -> list[Passage]:
        fetch = k * self.overfetch
        while True:
            got = list(self._retrieve(query, fetch))
            for p in got:
                if "source" not in p.metadata:
                    raise RetrievalError(
                        "Example building needs passages that name their document in metadata['source'] "
                        f"(passage {p.id!r} has none), to keep a target's own document out of retrieval."
                    )
            kept = [
                p
                for p in got
                if p.metadata["source"] != exclude_source and p.metadata["source"] not in self.always_exclude
            ]
            if len(kept) >= k or len(got) < fetch or fetch >= self.max_fetch:
                return kept[:k]
            fetch = min(fetch * 4, self.max_fetch)


def chunk_retriever(docs: Sequence[Document], tokenizer: Any, chunk_tokens: int = 128) -> Callable:
    """BM25 over ``chunk_tokens``-token chunks of ``docs`` (the paper's retriever), sources recorded."""
    texts, ids, metas = [], [], []
    for d in docs:
        for c in chunk_text(d.text, tokenizer, chunk_tokens=chunk_tokens):
            texts.append(c.text)
            ids.append(f"{d.source}#{c.index}")
            metas.append({"source": d.source, "chunk_index": c.index})
    if not texts:
        raise ConfigError("The retrieval corpus has no text.")
    return BM25Retriever(texts, ids=ids, metadatas=metas).retrieve


def target_positions(doc: Document, settings: ExampleSettings) -> list[int]:
    last = len(doc.ids) - settings.target_tokens
    return list(range(settings.first_target, last + 1, settings.target_every))


def build_examples(
    docs: Sequence[Document],
    tokenizer: Any,
    retrieve: Callable[[str, int], Sequence[Passage]],
    settings: ExampleSettings | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[Example]:
    """Sample target windows from ``docs`` and retrieve a passage for each (never from the same doc).

    Targets are drawn uniformly from all candidate positions of all documents (seeded), so long
    documents contribute in proportion to their length.
    """
    settings = settings or ExampleSettings()
    candidates = [(i, t) for i, d in enumerate(docs) for t in target_positions(d, settings)]
    if not candidates:
        raise ConfigError(
            f"No target windows: every document is shorter than first_target + target_tokens = "
            f"{settings.first_target + settings.target_tokens} tokens. Lower first_target or add longer documents."
        )
    rng = random.Random(seed)
    if max_examples is not None and max_examples < len(candidates):
        candidates = rng.sample(candidates, max_examples)
        candidates.sort()
    excluding = retrieve if isinstance(retrieve, ExcludingRetriever) else ExcludingRetriever(retrieve)
    special = set(tokenizer.all_special_ids)
    examples = []
    iterator: Iterable = candidates
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(candidates, desc="building examples", unit="ex")
    for i, t in iterator:
        doc = docs[i]
        query = tokenizer.decode(doc.ids[max(0, t - settings.query_tokens) : t], skip_special_tokens=True)
        passages = excluding(query, settings.num_passages, doc.source)
        block: list[int] = []
        for p in passages:
            tokens = (
                list(p.token_ids)
                if p.token_ids is not None
                else tokenizer(p.text, add_special_tokens=False)["input_ids"]
            )
            block.extend([x for x in tokens if x not in special][: settings.max_doc_tokens])
        window = rng.randint(settings.min_window, settings.max_window)
        src_len = max(window - len(block), 1)
        examples.append(
            Example(
                source=doc.source,
                target_start=t,
                src=list(doc.ids[max(0, t - src_len) : t]),
                doc=block,
                tgt=list(doc.ids[t : t + settings.target_tokens]),
                query=query,
                passage_ids=[str(p.id) for p in passages],
            )
        )
    return examples


def example_ids(example: Example, layout: str, marks: MarkIds | None) -> list[int]:
    """The ids of one example in a layout (``none``, ``append``, ``prepend``); the target is last.

    Built with the engine's own :func:`build_context`, so training and scoring see the layout
    that generation serves.
    """
    if layout not in ("none", "append", "prepend"):
        raise ConfigError(f"layout must be none, append or prepend, got {layout!r}.")
    block = wrap_block(example.doc, marks)
    return build_context(layout, example.src, example.tgt, 0, block, bos_id=None)


def example_spans(example: Example, marks: MarkIds | None, tail_tokens: int = 1) -> list[Span]:
    """One example in the isolated layout (the engine's :func:`build_spans`): head, passage, tail + target."""
    block = wrap_block(example.doc, marks)
    return build_spans("isolated", example.src, example.tgt, 0, [block] if block else [], None, tail_tokens=tail_tokens)


def summarize(examples: Sequence[Example]) -> dict[str, Any]:
    sources = {e.source for e in examples}
    return {
        "examples": len(examples),
        "documents": len(sources),
        "target_tokens": sum(len(e.tgt) for e in examples),
        "mean_src_tokens": round(sum(len(e.src) for e in examples) / max(len(examples), 1), 1),
        "mean_doc_tokens": round(sum(len(e.doc) for e in examples) / max(len(examples), 1), 1),
        "without_passage": sum(1 for e in examples if not e.doc),
    }


def save_examples(path: str | Path, examples: Sequence[Example], meta: dict[str, Any] | None = None) -> None:
    """Gzip JSON lines: a header (format, settings, summary, ``meta``) then one example per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = {"format": "flashback-examples", "version": FORMAT_VERSION, "summary": summarize(examples), **(meta or {})}
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        for e in examples:
            fh.write(json.dumps(asdict(e)) + "\n")
    tmp.replace(path)


def load_examples(
    path: str | Path, max_examples: int | None = None, seed: int = 0
) -> tuple[list[Example], dict[str, Any]]:
    """Examples and header of a file; ``max_examples`` keeps a seeded random subset, in file order
    (files are grouped by document, so the first N would cover only a few documents)."""
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1, got {max_examples}.")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Example file {path} does not exist; build it with `flashback data build`.")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        try:
            header = json.loads(fh.readline())
        except (json.JSONDecodeError, OSError) as exc:
            raise ConfigError(f"{path} is not a FlashBack example file ({exc}).") from exc
        if header.get("format") != "flashback-examples":
            raise ConfigError(f"{path} is not a FlashBack example file (no flashback-examples header).")
        examples = [Example(**json.loads(line)) for line in fh if line.strip()]
    if max_examples is not None and max_examples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        header = {**header, "subset": {"examples": max_examples, "of": len(examples), "seed": seed}}
        examples = [examples[i] for i in keep]
    return examples, header


@dataclass(frozen=True)
class ExampleSource:
    """Where targets and their passages come from."""

    docs: list[Path] | None = setting(None, "Files/folders the targets come from (repeatable).")
    include: list[str] | None = setting(None, "Glob on paths under --docs to keep.")
    exclude: list[str] | None = setting(None, "Glob on paths under --docs to drop.")
    retrieval: list[Path] | None = setting(
        None, "Files/folders to retrieve from with BM25 (default: the --docs files)."
    )
    retrieval_include: list[str] | None = setting(None, "Glob under --retrieval.")
    retrieval_exclude: list[str] | None = setting(None, "Glob under --retrieval.")
    collection: str | None = setting(None, "Retrieve from this Chroma collection (dense) instead of BM25.")
    chunk_tokens: int = setting(128, "BM25 chunk size in reader tokens.")


def examples_from(
    source: ExampleSource,
    store: StoreLocation,
    model: str,
    settings: ExampleSettings,
    max_examples: int | None,
    val_fraction: float,
    max_val_examples: int | None,
    seed: int,
    exclude_all_docs: bool = False,
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """:func:`prepare_examples` for the CLI's settings: the reader's tokenizer, and a Chroma retriever
    when ``source.collection`` is set."""
    from ..loading.resolve import load_pretrained, resolve_model
    from ..store import ChromaRetriever

    if not source.docs:
        raise ConfigError("give --docs (files/folders the targets come from) or --examples.")
    retriever = None
    if source.collection:
        retriever = ChromaRetriever(source.collection, client=store.connect()).retrieve
    return prepare_examples(
        load_pretrained(resolve_model(model), "tokenizer"),
        source.docs,
        source.include or (),
        source.exclude or (),
        source.retrieval,
        source.retrieval_include or (),
        source.retrieval_exclude or (),
        retriever,
        settings,
        max_examples,
        val_fraction,
        max_val_examples,
        source.chunk_tokens,
        seed,
        exclude_all_docs=exclude_all_docs,
    )


def load_examples_file(path: str | Path, max_examples: int | None, seed: int) -> tuple[list[Example], dict[str, Any]]:
    """Examples from ``flashback data build`` and the summary that travels with them."""
    examples, header = load_examples(path, max_examples, seed)
    info = {"examples_file": str(path), **header.get("info", {})}
    if "subset" in header:
        info["subset"] = header["subset"]
    return examples, info


def prepare_examples(
    tokenizer: Any,
    docs: Sequence[str | Path],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    retrieval: Sequence[str | Path] | None = None,
    retrieval_include: Sequence[str] = (),
    retrieval_exclude: Sequence[str] = (),
    retriever: Callable[[str, int], Sequence[Passage]] | None = None,
    settings: ExampleSettings | None = None,
    max_examples: int | None = None,
    val_fraction: float = 0.0,
    max_val_examples: int | None = None,
    chunk_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
    exclude_all_docs: bool = False,
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Documents -> (examples, validation examples from held-back whole documents, summary).

    Retrieval is BM25 over ``chunk_tokens`` chunks of ``retrieval`` (default: the same files as
    ``docs``), or ``retriever`` (e.g. a ``ChromaRetriever``); either way a target's own document
    is filtered out of its results. ``exclude_all_docs`` (evaluation) keeps every document of
    ``docs`` out of retrieval, not only each target's own.
    """
    settings = settings or ExampleSettings()
    documents = load_documents(docs, tokenizer, include, exclude)
    if not documents:
        raise ConfigError(
            f"No text documents under {[str(d) for d in docs]} with include={include}, exclude={exclude}."
        )
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    info: dict[str, Any] = {
        "docs": [str(d) for d in docs],
        "include": list(include),
        "exclude": list(exclude),
        "corpus_documents": len(documents),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "val_sources": sorted(d.source for d in val_docs),
        "settings": asdict(settings),
        "seed": seed,
    }
    if retriever is None:
        if retrieval is None:
            corpus_docs = documents
            info["retrieval"] = f"BM25 over {chunk_tokens}-token chunks of the same documents"
        else:
            corpus_docs = load_documents(retrieval, tokenizer, retrieval_include, retrieval_exclude)
            info["retrieval"] = (
                f"BM25 over {chunk_tokens}-token chunks of {[str(r) for r in retrieval]} "
                f"(include={list(retrieval_include)}, exclude={list(retrieval_exclude)})"
            )
        retriever = chunk_retriever(corpus_docs, tokenizer, chunk_tokens)
        info["retrieval_documents"] = len(corpus_docs)
    else:
        info["retrieval"] = type(retriever).__name__
    if exclude_all_docs:
        retriever = ExcludingRetriever(retriever, always_exclude={d.source for d in documents})
        info["retrieval"] += "; all target documents excluded"
    train = build_examples(train_docs, tokenizer, retriever, settings, max_examples, seed, progress)
    val = (
        build_examples(val_docs, tokenizer, retriever, settings, max_val_examples, seed + 1, progress)
        if val_docs
        else []
    )
    return train, val, info
