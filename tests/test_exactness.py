"""The core promise: cached generation equals a full recompute over the docs/method.md layout.

The reference here is written from the docs/method.md table alone; it does not use the package's
layout or engine code.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny import ARCHS, HashRetriever, make_model

from flashback_integrations import FlashBackConfig, FlashBackModel, Retrieval

MODES = ("append", "prepend")
GRID = list(itertools.product(MODES, (True, False), (1, 3), (1, 4, 16)))
MAX_DOC = 12
QUERY_TOKENS = 8


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request) -> FlashBackModel:
    model, tok = make_model(request.param, marks=True, seed=1)
    # one call's own cache arithmetic, counted from cold: no reuse across calls (that is test_context_pool.py)
    return FlashBackModel(model, tok, name=f"tiny-{request.param}", context_cache_bytes=0)


def doc_ids(tok, texts: list[str]) -> list[int]:
    special = set(tok.all_special_ids)
    out: list[int] = []
    for text in texts:
        out += [t for t in tok(text, add_special_tokens=False).input_ids if t not in special][:MAX_DOC]
    return out


def reference_context(fb: FlashBackModel, mode: str, marks: bool, P, G, j: int, texts: list[str]) -> list[int]:
    """docs/method.md, "Context layout", row by row."""
    tok = fb.tokenizer
    doc = doc_ids(tok, texts)
    if mode == "none" or not doc:
        return P + G
    ml, mr = tok.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])
    block = [ml, *doc, mr] if marks else doc
    if mode == "append":
        return P + G[:j] + block + G[j:]
    bos = [P[0]] if tok.bos_token_id is not None and P[0] == tok.bos_token_id else []
    return bos + block + P[len(bos) :] + G


def full_logits(fb: FlashBackModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return fb.model(input_ids=torch.tensor([ids])).logits[0, -1]


def reference_query(fb: FlashBackModel, P, G, j: int) -> str:
    return fb.tokenizer.decode((P + G[:j])[-QUERY_TOKENS:], skip_special_tokens=True).strip()


def naive_greedy(fb, prompt: str, mode: str, marks: bool, k: int, s: int, n: int) -> list[int]:
    """Recompute everything for every token: retrieve, lay out, full forward, mask marks, argmax."""
    retriever = HashRetriever()
    tok = fb.tokenizer
    P = tok(prompt).input_ids
    G: list[int] = []
    texts: list[str] = []
    j = 0
    mark_ids = tok.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])
    for t in range(n):
        if t % s == 0:
            j = t
            texts = [p.text for p in retriever.retrieve(reference_query(fb, P, G, t), k)]
        logits = full_logits(fb, reference_context(fb, mode, marks, P, G, j, texts)).clone()
        logits[mark_ids] = float("-inf")
        G.append(int(torch.argmax(logits)))
    return G


@pytest.mark.parametrize(("mode", "marks", "k", "s"), GRID)
def test_logits_equal_full_forward(arch_model: FlashBackModel, mode, marks, k, s) -> None:
    fb = arch_model
    config = FlashBackConfig(
        mode=mode, marks=marks, num_passages=k, stride=s, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    n = max(8, 2 * s + 3)
    prompt = "The json module encodes"
    P = fb.tokenizer(prompt).input_ids
    events = list(
        fb.stream(prompt, HashRetriever(), config=config, max_new_tokens=n, ignore_eos=True, output_logits=True)
    )
    tokens = [e for e in events if type(e).__name__ == "TokenEvent"]
    retrievals: list[Retrieval] = [e.retrieval for e in events if type(e).__name__ == "RetrievalEvent"]
    assert [r.step for r in retrievals] == list(range(0, n, s))
    G = [e.token_id for e in tokens]
    assert len(G) == n
    for t, event in enumerate(tokens):
        r = [r for r in retrievals if r.step <= t][-1]
        assert r.query == reference_query(fb, P, G, r.step)
        ctx = reference_context(fb, mode, marks, P, G[:t], r.step, [p.text for p in r.passages])
        diff = (event.logits - full_logits(fb, ctx)).abs().max().item()
        assert diff <= 1e-4, f"step {t}: max |cached - full| = {diff}"
    assert naive_greedy(fb, prompt, mode, marks, k, s, n) == G


@pytest.mark.parametrize("mode", ("append", "prepend", "none"))
def test_greedy_matches_naive_reference(arch_model: FlashBackModel, mode: str) -> None:
    config = FlashBackConfig(
        mode=mode, marks=True, num_passages=2, stride=4, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    n = 20
    out = arch_model.generate("Regular expressions", HashRetriever(), config=config, max_new_tokens=n, ignore_eos=True)
    if mode == "none":
        expected = naive_greedy(arch_model, "Regular expressions", "none", True, 1, n + 1, n)
    else:
        expected = naive_greedy(arch_model, "Regular expressions", mode, True, 2, 4, n)
    assert out.token_ids == expected


@pytest.mark.parametrize("marks", (True, False))
def test_append_cache_arithmetic(arch_model: FlashBackModel, marks: bool) -> None:
    """docs/method.md step 3: keep P + G[:j-s], feed G[j-s:j] + block (s + |B| tokens) in one forward."""
    s = 4
    config = FlashBackConfig(
        mode="append", marks=marks, stride=s, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC, num_passages=1
    )
    P = arch_model.tokenizer("The json module").input_ids
    out = arch_model.generate("The json module", HashRetriever(), config=config, max_new_tokens=17, ignore_eos=True)
    first, *later = out.retrievals
    assert (first.reused_tokens, first.prefill_tokens) == (0, len(P) + first.block_tokens)
    for r in later:
        assert r.block_tokens > 0
        assert r.reused_tokens == len(P) + r.step - s
        assert r.prefill_tokens == s + r.block_tokens


def test_cache_outgrows_its_room_and_crops_exactly(arch_model: FlashBackModel) -> None:
    """KVContext's cache writes into spare room; growing past it, cropping and changing rows stay exact."""
    from flashback_integrations.engine.kv import KVContext

    fb = arch_model
    gen = torch.Generator().manual_seed(3)
    special = set(fb.tokenizer.all_special_ids)
    pool = [i for i in range(fb.model.config.vocab_size) if i not in special]

    def rand(n: int) -> list[int]:
        return [pool[i] for i in torch.randint(len(pool), (n,), generator=gen).tolist()]

    # (context, ids the cache should keep): the first room holds 200 + 256 ids (tiny models: 512 positions)
    steps = [(rand(200), 0)]
    for _ in range(8):  # decode steps
        steps.append((steps[-1][0] + rand(1), len(steps[-1][0])))
    steps.append((steps[-1][0] + rand(260), len(steps[-1][0])))  # one forward past the room
    steps.append((steps[-1][0][:150] + rand(40), 150))  # crop deep, then regrow
    steps.append((steps[-1][0] + rand(1), 190))
    kv = KVContext(fb.model)
    for ctx, keep in steps:
        logits, kept, fed = kv.next_logits(ctx)
        assert (kept, fed) == (keep, len(ctx) - keep)
        diff = (logits - full_logits(fb, ctx)).abs().max().item()
        assert diff <= 1e-4, f"context of {len(ctx)} ids: max |cached - full| = {diff}"
    rows = [steps[-1][0][:100], rand(100)]  # two rows after one: a fresh cache, exact per row
    logits, kept, _ = kv.next_logits_rows(rows)
    assert kept == 0
    for row, got in zip(rows, logits, strict=True):
        assert (got - full_logits(fb, row)).abs().max().item() <= 1e-4
