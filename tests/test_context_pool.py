"""Reuse across calls on the torch backend: a chat's next turn feeds only its new message, exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import HashRetriever, make_model

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel, TokenEvent

CONFIG = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12)


def _model(pool_bytes: int, arch: str = "llama") -> FlashBackModel:
    model, tok = make_model(arch, marks=True, seed=2)
    return FlashBackModel(model, tok, name="tiny", context_cache_bytes=pool_bytes)


def _turns(fb: FlashBackModel, mode: str, n: int = 4) -> list:
    """A conversation re-sent whole every turn: history + answer + a new message."""
    history = fb.encode("The json module dumps objects")
    results = []
    for turn in range(n):
        out = fb.generate(
            history, HashRetriever(), config=CONFIG.replace(mode=mode), max_new_tokens=6, ignore_eos=True,
            output_logits=True,
        )  # fmt: skip
        results.append(out)
        history = history + out.token_ids + fb.encode(f" and then question {turn} asks more")[1:]
    return results


@pytest.mark.parametrize("mode", ["none", "append", "isolated"])
def test_a_later_turn_feeds_only_its_new_message_and_gives_the_cold_logits(mode) -> None:
    pooled, cold = _model(2**26), _model(0)
    warm, fresh = _turns(pooled, mode), _turns(cold, mode)
    for a, b in zip(warm, fresh, strict=True):
        assert a.token_ids == b.token_ids
    for turn in range(1, len(warm)):
        assert warm[turn].forward_tokens < fresh[turn].forward_tokens
    if mode == "none":  # the whole earlier turn was cached: only the new message (and the last id) are fed
        message = len(pooled.encode(" and then question 0 asks more")) - 1
        assert warm[1].forward_tokens == message + 1 + 5  # new ids, the re-fed last answer id, 5 decode steps
    assert pooled.backend.pool.hits >= len(warm) - 1


def test_pooled_logits_equal_a_cold_calls() -> None:
    pooled, cold = _model(2**26), _model(0)
    prompt = pooled.encode("The json module dumps objects and loads them back")

    def logits(fb):
        return [
            e.logits
            for e in fb.stream(prompt, HashRetriever(), config=CONFIG, max_new_tokens=9, output_logits=True)
            if isinstance(e, TokenEvent)
        ]

    pooled.generate(prompt[:-3], HashRetriever(), config=CONFIG, max_new_tokens=4)  # leaves a shorter prefix
    for a, b in zip(logits(pooled), logits(cold), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_changed_weights_never_hit_and_the_bound_holds() -> None:
    fb = _model(2**26)
    plain = {"config": FlashBackConfig(mode="none"), "max_new_tokens": 4, "ignore_eos": True}
    fb.generate("The json module dumps", **plain)
    assert len(fb.backend.pool) == 1 and fb.backend.pool.bytes <= 2**26
    with torch.no_grad():
        fb.model.get_input_embeddings().weight[5] += 1.0  # an in-place edit: the old keys are stale
    again = fb.generate("The json module dumps", **plain)
    assert again.forward_tokens == again.prompt_tokens + 3 and fb.backend.pool.hits == 0
    tiny = _model(1024)  # smaller than any cache: nothing is kept
    tiny.generate("The json module dumps", **plain)
    assert len(tiny.backend.pool) == 0
    with pytest.raises(ConfigError, match="context_cache_bytes"):
        _model(-1)


def test_concurrent_calls_never_share_a_pooled_cache() -> None:
    fb, cold = _model(2**26), _model(0)
    prompts = [f"The json module dumps item {i} and more" for i in range(6)]
    want = {p: cold.generate(p, HashRetriever(), config=CONFIG, max_new_tokens=8).token_ids for p in prompts}
    fb.generate(prompts[0], HashRetriever(), config=CONFIG, max_new_tokens=8)
    got: dict[str, list[int]] = {}

    def work(p: str) -> None:
        got[p] = fb.generate(p, HashRetriever(), config=CONFIG, max_new_tokens=8).token_ids

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
