"""Sampling parity: top_k / min_p / repetition_penalty through transformers' processors; top_k is never passages."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import HashRetriever, make_model

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel

NONE = FlashBackConfig(mode="none")


@pytest.fixture(scope="module")
def plain() -> FlashBackModel:
    model, tok = make_model("llama", marks=False, seed=3)
    return FlashBackModel(model, tok)


@pytest.mark.parametrize("penalty", (1.0, 1.3, 0.8))
def test_greedy_with_repetition_penalty_equals_transformers_generate(plain, penalty) -> None:
    ids = plain.encode("The json module encodes")
    ours = plain.generate(ids, config=NONE, max_new_tokens=16, ignore_eos=True, repetition_penalty=penalty)
    with torch.no_grad():
        ref = plain.model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=16,
            min_new_tokens=16,
            repetition_penalty=penalty,
            pad_token_id=plain.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    assert ours.token_ids == ref


def test_sampling_settings_are_seeded_and_top_k_1_is_greedy(plain) -> None:
    def run(**kw):
        return plain.generate("The json", config=NONE, max_new_tokens=12, ignore_eos=True, **kw).token_ids

    greedy = run()
    assert run(temperature=1.5, top_k=1, seed=1) == greedy
    for kw in ({"top_k": 5}, {"min_p": 0.05}, {"top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2}):
        assert run(temperature=1.0, seed=7, **kw) == run(temperature=1.0, seed=7, **kw)
    samples = {tuple(run(temperature=2.0, top_k=50, seed=s)) for s in range(4)}
    assert len(samples) > 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": "high"}, "repetition_penalty"),
    ],
)
def test_bad_sampling_settings(plain, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        plain.generate("The json", config=NONE, max_new_tokens=2, **kwargs)


def test_top_k_never_changes_how_many_passages_are_retrieved(llama_fb) -> None:
    asked: list[int] = []

    def retriever(query: str, k: int):
        asked.append(k)
        return HashRetriever().retrieve(query, k)

    config = FlashBackConfig(stride=4, num_passages=2, query_tokens=8, max_doc_tokens=8)
    llama_fb.generate("The json module", retriever, config=config, max_new_tokens=8, temperature=1.0, top_k=5, seed=0)
    assert set(asked) == {2}
    with pytest.raises(ConfigError, match="num_passages"):
        config.replace(top_k=3)


def test_framework_top_k_is_sampling(llama_fb) -> None:
    pytest.importorskip("langchain_core")
    from flashback_integrations.langchain import FlashBackLLM

    asked: list[int] = []

    def retriever(query: str, k: int):
        asked.append(k)
        return HashRetriever().retrieve(query, k)

    llm = FlashBackLLM(flashback_model=llama_fb, retriever=retriever, stride=4, query_tokens=8, max_doc_tokens=8)
    llm.invoke("The json module", max_tokens=6, top_k=5, temperature=1.0, seed=1)
    llm.invoke("The json module", max_tokens=6, num_passages=3)
    assert set(asked) == {1, 3}
    assert llm.top_k is None and FlashBackLLM(flashback_model=llama_fb, top_k=7).top_k == 7


def test_manifests_and_example_files_with_the_old_name_still_load(tmp_path) -> None:
    from flashback_integrations.training.examples import ExampleSettings

    old = {"mode": "append", "stride": 16, "query_tokens": 32, "top_k": 2, "max_doc_tokens": 64}
    assert FlashBackConfig.from_dict(old).num_passages == 2
    assert ExampleSettings.from_dict({"top_k": 2, "max_doc_tokens": 64}).num_passages == 2
    from flashback_integrations.loading.shipped import SHIPPED_ADAPTERS

    for folder in SHIPPED_ADAPTERS.values():
        manifest = folder / "flashback_adapter.json"
        if manifest.is_file():
            assert FlashBackConfig.from_dict(json.loads(manifest.read_text())["flashback_config"]).num_passages == 1
