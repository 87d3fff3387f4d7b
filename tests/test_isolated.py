"""The isolated-passage layout and the portable append variant: cached logits equal one masked forward.

The reference is written from docs/method.md's tables alone (its own slicing, 4D mask and position ids);
it does not use the package's layout or cache code.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from tiny import HashRetriever, make_model

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel, Passage
from flashback_integrations.engine.activation import lora_gate

ROPE_ARCHS = ("llama", "qwen2", "mistral", "gemma")
MAX_DOC = 12
QUERY_TOKENS = 8
PROMPT = "The json module encodes Python objects"


@pytest.fixture(scope="module", params=ROPE_ARCHS)
def fb(request) -> FlashBackModel:
    model, tok = make_model(request.param, marks=True, seed=2)
    # one call's own cache arithmetic, counted from cold: no reuse across calls (that is test_context_pool.py)
    return FlashBackModel(model, tok, name=f"tiny-{request.param}", context_cache_bytes=0)


def segments_of(fb: FlashBackModel, texts: list[str], marks: bool) -> list[list[int]]:
    tok = fb.tokenizer
    special = set(tok.all_special_ids)
    ml, mr = tok.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])
    out = []
    for text in texts:
        ids = [t for t in tok(text, add_special_tokens=False).input_ids if t not in special][:MAX_DOC]
        if ids:
            out.append([ml, *ids, mr] if marks else ids)
    return out


def isolated_forward(fb, P, G, j, segs, t, sink=False, gated=False) -> torch.Tensor:
    """docs/method.md's isolated table as one forward: head, segments at negative positions, tail. ``gated``:
    an activated adapter is on for the segments and the tail only."""
    H = P + G[:j]
    if not segs:
        ids, pos = P + G, list(range(len(P + G)))
        groups = ["text"] * len(ids)
    else:
        head, tail = H[: max(0, len(H) - t)], H[max(0, len(H) - t) :] + G[j:]
        ids, pos, groups = list(head), list(range(len(head))), ["text"] * len(head)
        p = -sum(len(s) for s in segs)
        for g, seg in enumerate(segs):
            ids += seg
            pos += list(range(p, p + len(seg)))
            groups += [g] * len(seg)
            p += len(seg)
        ids += tail
        pos += list(range(len(head), len(head) + len(tail)))
        groups += ["text"] * len(tail)
    n = len(ids)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    first_text = groups.index("text") if "text" in groups else None
    for q in range(n):
        for k in range(n):
            if groups[q] == "text":
                allowed[q, k] = k <= q  # the text attends to everything before it
            else:
                allowed[q, k] = (groups[k] == groups[q] and k <= q) or (sink and k == first_text)
    dtype = fb.model.dtype
    mask = torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    head = len(H) - t if segs else n  # tokens before the first segment: the text's head
    gate = torch.tensor([[i >= max(head, 0) for i in range(n)]]) if gated else None
    with torch.no_grad(), lora_gate(gate):
        out = fb.model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), attention_mask=mask)
    return out.logits[0, -1]


def offset_append_forward(fb, P, G, j, block, k) -> torch.Tensor:
    """The portable append variant: ``P + G[:j-k] + block + G[j-k:]`` (block at the start if shorter)."""
    H = P + G[:j]
    cut = max(0, len(H) - k)
    ids = H[:cut] + block + H[cut:] + G[j:] if block else P + G
    with torch.no_grad():
        return fb.model(input_ids=torch.tensor([ids])).logits[0, -1]


def query(fb, P, G, j) -> str:
    return fb.tokenizer.decode((P + G[:j])[-QUERY_TOKENS:], skip_special_tokens=True).strip()


def run_and_check(fb, config: FlashBackConfig, n: int, prompt: str = PROMPT, reference=None):
    tok = fb.tokenizer
    P = tok(prompt).input_ids
    events = list(
        fb.stream(prompt, HashRetriever(), config=config, max_new_tokens=n, ignore_eos=True, output_logits=True)
    )
    tokens = [e for e in events if type(e).__name__ == "TokenEvent"]
    retrievals = [e.retrieval for e in events if type(e).__name__ == "RetrievalEvent"]
    G = [e.token_id for e in tokens]
    assert [r.step for r in retrievals] == list(range(0, n, config.stride))
    for step, event in enumerate(tokens):
        r = [r for r in retrievals if r.step <= step][-1]
        assert r.query == query(fb, P, G, r.step)
        texts = [p.text for p in r.passages]
        if reference is None:
            segs = segments_of(fb, texts, bool(config.marks))
            ref = isolated_forward(fb, P, G[:step], r.step, segs, config.tail_tokens, config.passage_sink)
        else:
            ref = reference(P, G[:step], r.step, texts)
        diff = (event.logits - ref).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max |cached - full| = {diff}"
    return G, retrievals


GRID = list(itertools.product((1, 4), (1, 4, 16), (1, 3), (True, False)))


@pytest.mark.parametrize(("t", "s", "k", "marks"), GRID)
def test_isolated_logits_equal_masked_forward_cold_and_warm(fb: FlashBackModel, t, s, k, marks) -> None:
    config = FlashBackConfig(
        mode="isolated",
        tail_tokens=t,
        stride=s,
        num_passages=k,
        marks=marks,
        query_tokens=QUERY_TOKENS,
        max_doc_tokens=MAX_DOC,
    )
    fb.passage_cache.clear()
    n = max(8, 2 * s + 3)
    cold, cold_r = run_and_check(fb, config, n)
    warm, warm_r = run_and_check(fb, config, n)  # same passages again: every segment from the cache
    assert warm == cold
    assert sum(r.segments_computed for r in warm_r) == 0
    assert sum(r.segments_reused for r in warm_r) == sum(r.segments_computed + r.segments_reused for r in cold_r) > 0


@pytest.mark.parametrize("t", (1, 4))
def test_isolated_with_passage_sink(fb: FlashBackModel, t: int) -> None:
    config = FlashBackConfig(
        mode="isolated", tail_tokens=t, stride=4, num_passages=2, marks=True, passage_sink=True,
        query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC,
    )  # fmt: skip
    run_and_check(fb, config, 11)
    run_and_check(fb, config, 11)  # warm: the sink is part of the segment's key


def test_isolated_cache_arithmetic(fb: FlashBackModel) -> None:
    """Crop to the head's end, feed the s tokens that leave the tail plus the t tail tokens."""
    s, t = 4, 2
    config = FlashBackConfig(
        mode="isolated", tail_tokens=t, stride=s, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    fb.passage_cache.clear()
    P = fb.tokenizer(PROMPT).input_ids
    out = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=17, ignore_eos=True)
    first, *later = out.retrievals
    assert (first.reused_tokens, first.prefill_tokens) == (0, len(P))
    assert first.segments_computed == 1 and first.segment_tokens_computed == first.block_tokens
    for r in later:
        assert r.reused_tokens == len(P) + r.step - s - t  # the previous head
        assert r.prefill_tokens == s + t
        assert r.segments_computed + r.segments_reused == 1


@pytest.mark.parametrize("merged", (True, False))
def test_a_warm_retrieval_is_one_forward_or_two_without_custom_masks(fb: FlashBackModel, merged, monkeypatch) -> None:
    """Merged: the s head tokens and the t tail tokens in one forward (head rows blind to the segments);
    attention kernels without custom masks get two forwards; both exact (logits checked per token)."""
    import flashback_integrations.engine.kv as kvcache

    if not merged:
        monkeypatch.setattr(kvcache, "takes_custom_masks", lambda model: False)
    calls: list[int] = []
    handle = fb.model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    config = FlashBackConfig(
        mode="isolated", tail_tokens=3, stride=4, marks=True, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    try:
        run_and_check(fb, config, 14)  # cold, then warm (segments from the cache): exact both times
        calls.clear()
        out = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=14, ignore_eos=True)
    finally:
        handle.remove()
    assert all(r.segments_computed == 0 for r in out.retrievals)
    later = len(out.retrievals) - 1
    # step 0: head + tail (one forward merged); each later retrieval s + t; every other step one token
    expected = (1 if merged else 2) + (later * (1 if merged else 2)) + (14 - 1 - later)
    assert len(calls) == expected
    if merged:
        assert sorted(set(calls) - {1}) == sorted({4 + 3, len(fb.tokenizer(PROMPT).input_ids)})
        fb.passage_cache.clear()  # cold: each new passage is fed in that same forward, seeing itself only
        calls.clear()
        handle = fb.model.register_forward_pre_hook(
            lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        try:
            cold = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=14, ignore_eos=True)
        finally:
            handle.remove()
        assert cold.token_ids == out.token_ids and len(calls) == expected
        assert cold.retrievals[0].segments_computed == 1  # later ones may meet a passage again
        assert all(r.segments_computed + r.segments_reused == 1 for r in cold.retrievals)


def test_history_shorter_than_tail_makes_the_head_empty(fb: FlashBackModel) -> None:
    config = FlashBackConfig(
        mode="isolated", tail_tokens=40, stride=4, marks=True, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    P = fb.tokenizer("The json").input_ids
    G, retrievals = run_and_check(fb, config, 10, prompt="The json")
    assert retrievals[0].reused_tokens == 0
    assert retrievals[1].reused_tokens == 0 and retrievals[1].prefill_tokens == len(P) + 4  # all of H is tail


def naive_isolated_greedy(fb, prompt: str, t: int, s: int, k: int, n: int) -> list[int]:
    tok = fb.tokenizer
    P = tok(prompt).input_ids
    G: list[int] = []
    retriever = HashRetriever()
    marks = tok.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])
    for step in range(n):
        if step % s == 0:
            j = step
            segs = segments_of(fb, [p.text for p in retriever.retrieve(query(fb, P, G, step), k)], True)
        logits = isolated_forward(fb, P, G, j, segs, t).clone()
        logits[marks] = float("-inf")
        G.append(int(torch.argmax(logits)))
    return G


def test_isolated_greedy_equals_naive_loop(fb: FlashBackModel) -> None:
    config = FlashBackConfig(
        mode="isolated",
        tail_tokens=2,
        stride=4,
        num_passages=2,
        marks=True,
        query_tokens=QUERY_TOKENS,
        max_doc_tokens=MAX_DOC,
    )
    out = fb.generate("Regular expressions", HashRetriever(), config=config, max_new_tokens=18, ignore_eos=True)
    assert out.token_ids == naive_isolated_greedy(fb, "Regular expressions", 2, 4, 2, 18)


@pytest.mark.parametrize(("k", "s", "marks"), list(itertools.product((1, 5, 40), (1, 4), (True, False))))
def test_append_with_block_offset_equals_full_forward(fb: FlashBackModel, k, s, marks) -> None:
    config = FlashBackConfig(
        mode="append",
        block_offset=k,
        stride=s,
        num_passages=2,
        marks=marks,
        query_tokens=QUERY_TOKENS,
        max_doc_tokens=MAX_DOC,
    )
    tok = fb.tokenizer
    ml, mr = tok.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])

    def reference(P, G, j, texts):
        doc = [i for seg in segments_of(fb, texts, False) for i in seg]
        block = ([ml, *doc, mr] if marks else doc) if doc else []
        return offset_append_forward(fb, P, G, j, block, k)

    _, retrievals = run_and_check(fb, config, 2 * s + 5, reference=reference)
    P = tok(PROMPT).input_ids
    for r in retrievals[1:]:
        if k < len(P):  # cost per retrieval: s + k + |B| (marks included)
            assert r.prefill_tokens == s + k + r.block_tokens


class FixedRetriever:
    """Passages of a fixed token length (rows of a batch keep equal lengths)."""

    def __init__(self, vocab: int, size: int = 6) -> None:
        self.vocab, self.size = vocab, size

    def retrieve(self, query: str, k: int) -> list[Passage]:
        seed = sum(map(ord, query))
        return [
            Passage(text="", token_ids=[10 + (seed * 7 + 13 * i + 3 * n) % (self.vocab - 20) for n in range(self.size)])
            for i in range(k)
        ]


def test_generate_batch_rows_equal_single_rows(fb: FlashBackModel) -> None:
    config = FlashBackConfig(
        mode="isolated",
        tail_tokens=2,
        stride=4,
        num_passages=2,
        marks=True,
        query_tokens=QUERY_TOKENS,
        max_doc_tokens=MAX_DOC,
    )
    tok = fb.tokenizer
    prompts = [tok(p).input_ids for p in ("The json module encodes", "The http server serves")]
    width = min(len(p) for p in prompts)
    prompts = [p[:width] for p in prompts]
    retriever = FixedRetriever(len(tok) - 2)
    batch = fb.generate_batch(prompts, retriever, config=config, max_new_tokens=14)
    for prompt, row in zip(prompts, batch, strict=True):
        single = fb.generate(prompt, retriever, config=config, max_new_tokens=14, ignore_eos=True)
        assert row.token_ids == single.token_ids


def test_threads_share_the_passage_cache_and_equal_sequential(fb: FlashBackModel) -> None:
    config = FlashBackConfig(
        mode="isolated", stride=3, num_passages=2, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    prompts = ["The json module", "Regular expressions", "HTTP servers answer", "A retrieval model"] * 2
    fb.passage_cache.clear()
    expected = [
        fb.generate(p, HashRetriever(), config=config, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts
    ]
    fb.passage_cache.clear()
    got: list[list[int] | None] = [None] * len(prompts)

    def work(i: int) -> None:
        got[i] = fb.generate(prompts[i], HashRetriever(), config=config, max_new_tokens=12, ignore_eos=True).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == expected
    assert fb.passage_cache.hits > 0


def test_passage_cache_is_bounded_in_bytes_and_evicts() -> None:
    model, tok = make_model("llama", marks=True, seed=3)
    per_token = 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head dim x fp32
    limit = 30 * per_token  # about two segments of up to 14 tokens
    fb = FlashBackModel(model, tok, passage_cache_bytes=limit)
    config = FlashBackConfig(
        mode="isolated", stride=2, num_passages=3, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    first = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=30, ignore_eos=True)
    computed = sum(r.segment_tokens_computed for r in first.retrievals)
    cache = fb.passage_cache
    assert computed * per_token > limit  # more was computed than fits
    assert 0 < cache.bytes <= limit and 1 <= len(cache) <= 2
    again = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=30, ignore_eos=True)
    assert again.token_ids == first.token_ids  # evicted entries are recomputed, never wrong


def test_changed_weights_never_hit_the_passage_cache(fb: FlashBackModel) -> None:
    config = FlashBackConfig(
        mode="isolated", stride=4, num_passages=2, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC
    )
    fb.passage_cache.clear()
    before = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=12, ignore_eos=True)
    layer = fb.model.model.layers[0].self_attn.k_proj.weight
    saved = layer.detach().clone()
    try:
        with torch.no_grad():
            layer.mul_(1.5)  # what a merged adapter does: the same tensors, other values
        changed = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=12, ignore_eos=True)
        assert all(r.segments_reused == 0 for r in changed.retrievals[:1])
        fresh = FlashBackModel(fb.model, fb.tokenizer)  # an empty passage cache: the truth
        assert (
            changed.token_ids
            == fresh.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=12, ignore_eos=True).token_ids
        )
    finally:
        with torch.no_grad():
            layer.copy_(saved)
    again = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=12, ignore_eos=True)
    assert again.token_ids == before.token_ids


def test_a_peft_adapter_switch_never_hits_the_passage_cache() -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = make_model("qwen2", marks=True, seed=4)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["k_proj", "v_proj"], init_lora_weights=False))
    fb = FlashBackModel(peft_model, tok)
    config = FlashBackConfig(mode="isolated", stride=4, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC)
    with_adapter = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=10, ignore_eos=True)
    with peft_model.disable_adapter():
        without = fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=10, ignore_eos=True)
        assert without.retrievals[0].segments_reused == 0
        truth = FlashBackModel(peft_model, tok).generate(
            PROMPT, HashRetriever(), config=config, max_new_tokens=10, ignore_eos=True
        )
    assert without.token_ids == truth.token_ids
    assert (
        fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=10, ignore_eos=True).token_ids
        == with_adapter.token_ids
    )


@pytest.mark.parametrize("arch", ("gpt2", "opt"))
def test_isolated_refused_on_learned_positions_and_model_unchanged(arch: str) -> None:
    model, tok = make_model(arch, marks=True)
    fb = FlashBackModel(model, tok)
    before = fb.generate(PROMPT, max_new_tokens=6, config=FlashBackConfig(mode="none"), ignore_eos=True)
    with pytest.raises(ConfigError, match="rotary.*append"):
        fb.generate(PROMPT, HashRetriever(), config=FlashBackConfig(mode="isolated"), max_new_tokens=6)
    after = fb.generate(PROMPT, max_new_tokens=6, config=FlashBackConfig(mode="none"), ignore_eos=True)
    assert after.token_ids == before.token_ids


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mode": "isolated", "tail_tokens": 0}, "tail_tokens"),
        ({"mode": "isolated", "tail_tokens": -2}, "tail_tokens"),
        ({"mode": "isolated", "tail_tokens": 1.5}, "tail_tokens"),
        ({"mode": "isolated", "passage_sink": "yes"}, "passage_sink"),
        ({"mode": "append", "passage_sink": True}, "passage_sink"),
        ({"mode": "append", "block_offset": -1}, "block_offset"),
        ({"mode": "isolated", "block_offset": 4}, "block_offset"),
        ({"mode": "prepend", "block_offset": 4}, "block_offset"),
    ],
)
def test_bad_isolated_settings_are_clear_errors(changes, match) -> None:
    with pytest.raises(ConfigError, match=match):
        FlashBackConfig(**changes)


@pytest.mark.parametrize("size", (0, -5, 1.5, True))
def test_bad_passage_cache_size(size) -> None:
    model, tok = make_model("llama", marks=False)
    with pytest.raises(ConfigError, match="passage_cache_bytes"):
        FlashBackModel(model, tok, passage_cache_bytes=size)


@pytest.mark.parametrize("arch", ("llama", "gemma"))
def test_scoring_and_training_layout_equals_what_generation_serves(arch: str) -> None:
    """``target_nll(layout='isolated')`` (one padded, masked batch) equals the engine's cached logits."""
    from flashback_integrations.engine.kv import KVContext
    from flashback_integrations.engine.layout import find_mark_ids
    from flashback_integrations.training.examples import Example, example_spans
    from flashback_integrations.training.scoring import target_nll

    model, tok = make_model(arch, marks=True, seed=5)
    marks = find_mark_ids(tok)
    gen = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return (torch.randint(5, len(tok) - 3, (n,), generator=gen)).tolist()

    examples = [Example("a", 0, rand(20), rand(7), rand(5)), Example("b", 0, rand(13), rand(4), rand(5))]
    examples.append(Example("c", 0, rand(9), [], rand(5)))  # no passage: plain text
    nll = target_nll(model, examples, "isolated", marks, tok.pad_token_id, tail_tokens=3)
    for e, row in zip(examples, nll, strict=True):
        kv = KVContext(model)
        for i, target in enumerate(e.tgt):
            spans = example_spans(Example(e.source, 0, e.src, e.doc, e.tgt[:i]), marks, 3)
            logits = kv.next_logits(spans)[0]
            expected = torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))
            assert row[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_a_kept_passage_behind_a_moved_head_rest_is_recomputed_exactly(fb: FlashBackModel) -> None:
    """Same head, same first passage, another second one: the cache never keeps a passage it cannot place."""
    from flashback_integrations.engine.kv import KVContext
    from flashback_integrations.engine.layout import build_spans

    gen = torch.Generator().manual_seed(7)

    def rand(n: int) -> list[int]:
        return torch.randint(5, len(fb.tokenizer) - 3, (n,), generator=gen).tolist()

    H, a, b, c = rand(20), rand(6), rand(5), rand(5)
    kv = KVContext(fb.model)
    for segs in ([a, b], [a, c], [a, c], [c, a]):
        logits, _, _ = kv.next_logits(build_spans("isolated", H, [], 0, segs, None, tail_tokens=2))
        ref = isolated_forward(fb, H, [], 0, segs, 2)
        assert (logits - ref).abs().max().item() <= 1e-4
    H2 = H + rand(3)  # then a normal next retrieval
    logits, kept, _ = kv.next_logits(build_spans("isolated", H2, [], 0, [b], None, tail_tokens=2))
    assert kept == 18 and (logits - isolated_forward(fb, H2, [], 0, [b], 2)).abs().max().item() <= 1e-4
