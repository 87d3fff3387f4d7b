"""Training and evaluation examples: target windows of their document, never a passage from it,
held-out documents kept apart; scoring left-padded batches like single examples.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_model, save_tiny_base

from flashback_integrations import ConfigError, RetrievalError
from flashback_integrations.data import sample_corpus_dir
from flashback_integrations.engine.layout import MarkIds, find_mark_ids
from flashback_integrations.retrieval.base import Passage
from flashback_integrations.training.examples import (
    ExampleSettings,
    ExcludingRetriever,
    build_examples,
    chunk_retriever,
    example_ids,
    load_documents,
    load_examples,
    prepare_examples,
    save_examples,
    split_documents,
)
from flashback_integrations.training.scoring import (
    collate,
    target_nll,
)

SETTINGS = ExampleSettings(
    context_budget=128,
    target_tokens=8,
    target_every=8,
    first_target=64,
    query_tokens=24,
    max_doc_tokens=24,
    min_window=48,
)


@pytest.fixture(scope="module")
def tok():
    return make_model("llama", marks=False)[1]


@pytest.fixture(scope="module")
def docs(tok):
    return load_documents([sample_corpus_dir()], tok)


@pytest.fixture(scope="module")
def examples(tok, docs):
    return build_examples(docs, tok, chunk_retriever(docs, tok, 32), SETTINGS, seed=0, progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    save_tiny_base(path)
    return path


def _load_base(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


FAST = dict(steps=6, batch_size=4, micro_batch_size=2, eval_every=3, save_every=2, lr=5e-3, device="cpu")


# --------------------------------------------------------------------------- examples
def test_examples_are_target_windows_of_their_document(examples, docs, tok) -> None:
    by_source = {d.source: d for d in docs}
    assert len(examples) > 20 and len({e.source for e in examples}) == len(docs)
    for e in examples:
        ids = by_source[e.source].ids
        t = e.target_start
        assert t >= SETTINGS.first_target and (t - SETTINGS.first_target) % SETTINGS.target_every == 0
        assert e.tgt == ids[t : t + SETTINGS.target_tokens]
        assert e.src == ids[t - len(e.src) : t]
        assert e.query == tok.decode(ids[t - SETTINGS.query_tokens : t], skip_special_tokens=True)
        assert len(e.doc) <= SETTINGS.max_doc_tokens
        window = len(e.src) + len(e.doc)
        assert window <= SETTINGS.max_window
        assert window >= SETTINGS.min_window or len(e.src) == t  # only a document's start can cut it shorter
        assert len(example_ids(e, "append", MarkIds(1, 2))) <= SETTINGS.context_budget


def test_a_target_never_retrieves_from_its_own_document(examples, docs, tok) -> None:
    assert sum(1 for e in examples if e.doc) > 0.5 * len(examples)  # stop-word-only queries retrieve nothing
    assert all(pid.rsplit("#", 1)[0] != e.source for e in examples for pid in e.passage_ids)

    # A retriever that always ranks the target's own document first (the copying shortcut).
    def own_first(query: str, k: int) -> list[Passage]:
        ranked = sorted(docs, key=lambda d: d.text.find(query) < 0)
        return [Passage(d.text[:200], id=d.source, metadata={"source": d.source}) for d in ranked][:k]

    got = build_examples(docs, tok, own_first, SETTINGS, max_examples=30, progress=False)
    assert got and all(e.passage_ids and e.passage_ids[0] != e.source for e in got)

    # When only the own document matches, the example gets no passage rather than a leaked one.
    def only_own(query: str, k: int) -> list[Passage]:
        return [Passage(d.text, id=d.source, metadata={"source": d.source}) for d in docs if query in d.text][:k]

    got = build_examples(docs, tok, only_own, SETTINGS, max_examples=30, progress=False)
    assert all(not e.doc and not e.passage_ids for e in got)


def test_excluding_retriever_asks_for_more_until_k_remain() -> None:
    calls = []

    def ranked(query: str, k: int) -> list[Passage]:
        calls.append(k)
        pool = [Passage(f"own {i}", metadata={"source": "a"}) for i in range(40)] + [
            Passage("other", metadata={"source": "b"})
        ]
        return pool[:k]

    assert [p.text for p in ExcludingRetriever(ranked, overfetch=2)("q", 1, "a")] == ["other"]
    assert calls == [2, 8, 32, 128]


def test_passages_without_a_source_are_refused(docs, tok) -> None:
    with pytest.raises(RetrievalError, match="metadata\\['source'\\]"):
        build_examples(docs, tok, lambda q, k: [Passage("x")], SETTINGS, max_examples=2, progress=False)


def test_layouts_marks_on_and_off(examples) -> None:
    e = next(e for e in examples if e.doc)
    marks = MarkIds(901, 902)
    assert example_ids(e, "none", marks) == e.src + e.tgt
    assert example_ids(e, "append", marks) == e.src + [901] + e.doc + [902] + e.tgt
    assert example_ids(e, "append", None) == e.src + e.doc + e.tgt
    assert example_ids(e, "prepend", marks) == [901] + e.doc + [902] + e.src + e.tgt
    assert example_ids(e, "prepend", None) == e.doc + e.src + e.tgt
    with pytest.raises(ConfigError):
        example_ids(e, "sideways", None)


def test_validation_split_keeps_documents_apart(docs, tok, tmp_path) -> None:
    train_docs, val_docs = split_documents(docs, 0.25, seed=3)
    assert {d.source for d in train_docs}.isdisjoint(d.source for d in val_docs) and len(val_docs) == 2
    tr, va, info = prepare_examples(
        tok, [sample_corpus_dir()], settings=SETTINGS, val_fraction=0.25, seed=3, chunk_tokens=32, progress=False
    )
    assert {e.source for e in tr}.isdisjoint(e.source for e in va) and va
    assert info["val_documents"] == 2
    save_examples(tmp_path / "ex.jsonl.gz", tr, {"info": info})
    loaded, header = load_examples(tmp_path / "ex.jsonl.gz")
    assert loaded == tr and header["summary"]["examples"] == len(tr) and header["info"]["seed"] == 3
    # a subset is seeded, keeps file order, spans documents and is recorded in the header
    sub, sub_header = load_examples(tmp_path / "ex.jsonl.gz", max_examples=5, seed=1)
    assert sub == load_examples(tmp_path / "ex.jsonl.gz", max_examples=5, seed=1)[0]
    assert sub != load_examples(tmp_path / "ex.jsonl.gz", max_examples=5, seed=2)[0]
    assert [tr.index(e) for e in sub] == sorted(tr.index(e) for e in sub) and len({e.source for e in sub}) > 1
    assert sub_header["subset"] == {"examples": 5, "of": len(tr), "seed": 1}
    assert load_examples(tmp_path / "ex.jsonl.gz", max_examples=10**6)[0] == tr
    with pytest.raises(ConfigError, match="at least 1"):
        load_examples(tmp_path / "ex.jsonl.gz", max_examples=0)


def test_bad_settings_and_files_are_explained(tmp_path, docs, tok) -> None:
    with pytest.raises(ConfigError, match="min_window"):
        ExampleSettings(context_budget=64, min_window=256)
    with pytest.raises(ConfigError, match="first_target"):
        build_examples(docs, tok, lambda q, k: [], ExampleSettings(first_target=100_000), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl.gz")


# --------------------------------------------------------------------------- scoring
def test_left_padded_batches_score_like_single_examples(examples) -> None:
    model, tok = make_model("llama", marks=True)
    marks = find_mark_ids(tok)
    batch = examples[:5]
    together = target_nll(model, batch, "append", marks, tok.pad_token_id, [marks.left, marks.right])
    for i, e in enumerate(batch):
        alone = target_nll(model, [e], "append", marks, tok.pad_token_id, [marks.left, marks.right])
        torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)
    # the marks are outside the softmax: the same as a log-softmax over the other ids
    ids = torch.tensor([example_ids(batch[0], "append", marks)])
    logits = model(ids).logits[0, -SETTINGS.target_tokens - 1 : -1]
    keep = [i for i in range(logits.shape[-1]) if i not in (marks.left, marks.right)]
    logp = torch.log_softmax(logits[:, keep], -1)
    expected = -logp[torch.arange(len(batch[0].tgt)), [keep.index(t) for t in batch[0].tgt]]
    torch.testing.assert_close(together[0], expected, atol=1e-4, rtol=1e-4)
    padded = collate([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert padded["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert padded["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_evaluation_examples_retrieve_from_none_of_the_held_out_documents(tok) -> None:
    held_out = ["json.txt", "re.txt", "logging.txt"]
    ex, _, info = prepare_examples(
        tok, [sample_corpus_dir()], include=held_out, retrieval=[sample_corpus_dir()], settings=SETTINGS,
        chunk_tokens=32, progress=False, exclude_all_docs=True,
    )  # fmt: skip
    sources = {e.source for e in ex}
    assert len(sources) == 3 and any(e.passage_ids for e in ex)
    assert all(pid.rsplit("#", 1)[0] not in sources for e in ex for pid in e.passage_ids)
    assert "all target documents excluded" in info["retrieval"]
