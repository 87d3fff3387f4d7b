"""Activated adapters (LoRA on from the passage on): exact against one masked, gated forward.

The reference is docs/method.md's isolated table as one forward (test_isolated's, written from the table
alone), with LoRA switched on for exactly the passage segments and the tail.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_isolated import MAX_DOC, PROMPT, QUERY_TOKENS, isolated_forward, query, segments_of
from tiny import HashRetriever, make_model

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel
from flashback_integrations.engine.activation import activate, is_activated


def activated_model(arch: str, seed: int = 3):
    model, tok = make_model(arch, marks=True, seed=seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    )
    peft_model.eval()
    assert activate(peft_model) == 3 * 2  # three projections in each of two layers
    return peft_model, tok


@pytest.fixture(scope="module", params=("llama", "qwen2", "gemma"))
def fb(request) -> FlashBackModel:
    model, tok = activated_model(request.param)
    return FlashBackModel(model, tok, name=f"tiny-activated-{request.param}")


def check(fb, config: FlashBackConfig, n: int) -> list[int]:
    P = fb.tokenizer(PROMPT).input_ids
    events = list(
        fb.stream(PROMPT, HashRetriever(), config=config, max_new_tokens=n, ignore_eos=True, output_logits=True)
    )
    tokens = [e for e in events if type(e).__name__ == "TokenEvent"]
    retrievals = [e.retrieval for e in events if type(e).__name__ == "RetrievalEvent"]
    G = [e.token_id for e in tokens]
    for step, event in enumerate(tokens):
        r = [r for r in retrievals if r.step <= step][-1]
        assert r.query == query(fb, P, G, r.step)
        segs = segments_of(fb, [p.text for p in r.passages], True)
        ref = isolated_forward(fb, P, G[:step], r.step, segs, config.tail_tokens, gated=True)
        diff = (event.logits - ref).abs().max().item()
        assert diff <= 1e-4, f"step {step}: max |cached - full| = {diff}"
    return G


@pytest.mark.parametrize(("t", "s", "k", "one_forward"), list(itertools.product((1, 4), (1, 4), (1, 3), (True, False))))
def test_activated_isolated_logits_equal_gated_forward(fb, t, s, k, one_forward, monkeypatch) -> None:
    import flashback_integrations.engine.kv as kvcache

    if not one_forward:  # kernels without custom masks: segments and head fed on their own
        monkeypatch.setattr(kvcache, "takes_custom_masks", lambda model: False)
    config = FlashBackConfig(
        mode="isolated",
        tail_tokens=t,
        stride=s,
        num_passages=k,
        marks=True,
        query_tokens=QUERY_TOKENS,
        max_doc_tokens=MAX_DOC,
    )
    fb.passage_cache.clear()
    n = max(8, 2 * s + 3)
    cold = check(fb, config, n)
    warm = check(fb, config, n)  # every passage from the passage cache
    assert cold == warm


def token_logits(fb, config) -> torch.Tensor:
    events = fb.stream(PROMPT, config=config, max_new_tokens=10, ignore_eos=True, output_logits=True)
    return torch.stack([e.logits for e in events if type(e).__name__ == "TokenEvent"])


def test_without_retrieval_an_activated_adapter_is_exactly_the_base_model(fb) -> None:
    config = FlashBackConfig(mode="none")
    fb.backend.pool.clear()  # both calls cold: bitwise equality (a pooled prefix is equal to float rounding)
    adapted = token_logits(fb, config)
    with fb.model.disable_adapter():
        base = token_logits(FlashBackModel(fb.model, fb.tokenizer), config)
    assert torch.equal(adapted, base)


def test_forwards_without_passage_tokens_skip_the_lora_layers(fb) -> None:
    """Not only the logits: a call without retrieval runs no LoRA product at all (base-model speed), and
    an isolated call runs them only in forwards that feed passage or tail tokens."""
    lora_a = [m for name, m in fb.model.named_modules() if name.endswith("lora_A.default")]
    assert lora_a
    calls: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in lora_a]
    try:
        fb.generate(PROMPT, None, config=FlashBackConfig(mode="none"), max_new_tokens=6, ignore_eos=True)
        assert calls == []
        config = FlashBackConfig(mode="isolated", stride=3, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC)
        fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=6, ignore_eos=True)
        assert len(calls) > 0 and len(calls) % len(lora_a) == 0
        assert fb.model.get_model_status().enabled is True  # skipping is not PEFT's "disabled" state
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode", ("append", "prepend"))
def test_an_activated_adapter_refuses_the_causal_block_modes(fb, mode) -> None:
    before = fb.generate(PROMPT, HashRetriever(), config=FlashBackConfig(mode="isolated"), max_new_tokens=6)
    with pytest.raises(ConfigError, match="activated.*isolated"):
        fb.generate(PROMPT, HashRetriever(), config=FlashBackConfig(mode=mode), max_new_tokens=6)
    after = fb.generate(PROMPT, HashRetriever(), config=FlashBackConfig(mode="isolated"), max_new_tokens=6)
    assert after.token_ids == before.token_ids


def test_threads_each_see_their_own_gate(fb) -> None:
    """The gate lives in a context variable: concurrent calls in isolated and none modes never mix."""
    configs = [
        FlashBackConfig(mode="isolated", stride=3, query_tokens=QUERY_TOKENS, max_doc_tokens=MAX_DOC),
        FlashBackConfig(mode="none"),
    ] * 4
    prompts = ["The json module", "Regular expressions", "HTTP servers answer", "A retrieval model"] * 2
    expected = [
        fb.generate(p, HashRetriever(), config=c, max_new_tokens=10, ignore_eos=True).token_ids
        for p, c in zip(prompts, configs, strict=True)
    ]
    got: list[list[int] | None] = [None] * len(prompts)

    def work(i: int) -> None:
        got[i] = fb.generate(
            prompts[i], HashRetriever(), config=configs[i], max_new_tokens=10, ignore_eos=True
        ).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == expected


def test_scoring_with_an_activated_adapter_equals_generation() -> None:
    """``target_nll`` (padded batch, 4D mask, per-token gate) equals the engine's cached logits; the
    no-retrieval layout scores exactly as the base model."""
    from flashback_integrations.engine.kv import KVContext
    from flashback_integrations.engine.layout import find_mark_ids
    from flashback_integrations.training.examples import Example, example_spans
    from flashback_integrations.training.scoring import target_nll

    model, tok = activated_model("llama", seed=6)
    marks = find_mark_ids(tok)
    gen = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(5, len(tok) - 3, (n,), generator=gen).tolist()

    examples = [Example("a", 0, rand(20), rand(7), rand(5)), Example("b", 0, rand(13), rand(4), rand(5))]
    examples.append(Example("c", 0, rand(9), [], rand(5)))
    nll = target_nll(model, examples, "isolated", marks, tok.pad_token_id, tail_tokens=3)
    for e, row in zip(examples, nll, strict=True):
        kv = KVContext(model)
        for i, target in enumerate(e.tgt):
            spans = example_spans(Example(e.source, 0, e.src, e.doc, e.tgt[:i]), marks, 3)
            logits = kv.next_logits(spans)[0]
            expected = torch.nn.functional.cross_entropy(logits[None], torch.tensor([target]))
            assert row[i].item() == pytest.approx(expected.item(), abs=1e-4)
    plain = target_nll(model, examples, "none", marks, tok.pad_token_id)
    with model.disable_adapter():
        base = target_nll(model, examples, "none", marks, tok.pad_token_id)
    assert torch.equal(plain, base)


def test_a_trained_activated_adapter_loads_activated_and_unmerged(tmp_path) -> None:
    from flashback_integrations.loading.adapter import load_adapter
    from flashback_integrations.training.examples import Example
    from flashback_integrations.training.trainer import TrainConfig, train

    model, tok = make_model("qwen2", marks=False, seed=8)
    gen = torch.Generator().manual_seed(1)

    def rand(n: int) -> list[int]:
        return torch.randint(5, len(tok) - 3, (n,), generator=gen).tolist()

    examples = [Example(f"d{i}", 0, rand(12), rand(6), rand(4)) for i in range(8)]
    cfg = TrainConfig(layout="isolated", activated=True, steps=2, batch_size=4, micro_batch_size=4, lr=1e-2)
    train(model, tok, examples, tmp_path / "a", cfg, progress=False)
    base, base_tok = make_model("qwen2", marks=False, seed=8)
    none = FlashBackConfig(mode="none")
    plain = FlashBackModel(base, base_tok).generate(PROMPT, config=none, max_new_tokens=8, ignore_eos=True).token_ids
    loaded, tok2, manifest = load_adapter(base, base_tok, tmp_path / "a")
    assert manifest.extra["activation"] == "passage" and is_activated(loaded)
    assert hasattr(loaded, "disable_adapter")  # a PeftModel: never merged
    fb = FlashBackModel(loaded, tok2, config=FlashBackConfig.from_dict(manifest.flashback_config))
    assert fb.generate(PROMPT, config=none, max_new_tokens=8, ignore_eos=True).token_ids == plain
    with pytest.raises(ConfigError, match="activated"):
        TrainConfig(layout="prepend", activated=True)
