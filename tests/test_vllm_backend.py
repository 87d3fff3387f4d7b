"""The server backend against a real vLLM (its CPU build) on 127.0.0.1, started here, nothing mocked: the
torch backend's greedy tokens in every mode, the prefix cache's reuse as vLLM itself reports it, and the
warnings a user gets from a vLLM started without prefix caching or without its cached-token counts.

Needs vLLM's virtualenv (``make vllm``, or ``FLASHBACK_VLLM_PYTHON``); skipped without it. vLLM's CPU
attention has no kernels for head size 8, so this tiny model has head_dim 32.
"""

from __future__ import annotations

import warnings

import pytest
from tiny import HashRetriever, check_stops_and_streams_like_torch, save_tiny_export

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.bench.servers import vllm_python, vllm_server
from flashback_integrations.engine.server import ServerError

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="vLLM not built (`make vllm`)")

TRAINED = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)
PROMPT = "The json module dumps and loads objects to text and back again for the caller, with indent and sort keys"
BLOCK = 32  # vLLM caches whole blocks; its CPU attention takes multiples of 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_tiny_export(tmp_path_factory, TRAINED, head_dim=32, gguf=False)


@pytest.fixture(scope="module")
def server(exported):
    with vllm_server(exported, max_model_len=512, extra=["--block-size", str(BLOCK)]) as url:
        yield url


@pytest.fixture(scope="module")
def both(exported, server):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vLLM's /tokenize, /detokenize and /v1/models pass every check
        remote = FlashBackModel.from_pretrained(str(exported), backend="openai", server_url=server)
    return FlashBackModel.from_pretrained(str(exported)), remote


def _run(fb: FlashBackModel, mode: str, block_offset: int = 0, **kwargs):
    config = TRAINED.replace(mode=mode, block_offset=block_offset)
    return fb.generate(PROMPT, HashRetriever(), config=config, max_new_tokens=24, ignore_eos=True, **kwargs)


@pytest.mark.parametrize(("mode", "offset"), [("none", 0), ("append", 0), ("prepend", 0), ("append", 5)])
def test_vllm_gives_the_torch_backends_tokens_and_serves_whole_blocks_from_its_cache(both, mode, offset) -> None:
    reference, remote = both
    want, got = _run(reference, mode, offset), _run(remote, mode, offset)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert [r.block_tokens for r in got.retrievals] == [r.block_tokens for r in want.retrievals]
    # what vLLM reports it served from its prefix cache: what torch keeps, down to whole blocks (after the
    # first retrieval, whose reuse depends on what earlier calls left in each cache)
    assert [r.reused_tokens for r in got.retrievals[1:]] == [
        r.reused_tokens // BLOCK * BLOCK for r in want.retrievals[1:]
    ]
    assert all(r.reused_tokens + r.prefill_tokens == w.reused_tokens + w.prefill_tokens
               for r, w in zip(got.retrievals, want.retrievals, strict=True))  # fmt: skip
    if mode == "append" and offset == 0:
        assert any(r.reused_tokens >= 2 * BLOCK for r in got.retrievals[1:])  # the text before the block is kept


def test_stop_strings_streaming_and_seeded_sampling_on_vllm(both, exported) -> None:
    _, remote = both
    check_stops_and_streams_like_torch(*both, _run, PROMPT, TRAINED)
    args = {"temperature": 0.9, "top_k": 20, "seed": 7, "max_new_tokens": 10, "ignore_eos": True}
    first = remote.generate(PROMPT, HashRetriever(), config=TRAINED, **args)
    assert remote.generate(PROMPT, HashRetriever(), config=TRAINED, **args).token_ids == first.token_ids
    assert remote.backend.context_window == 512  # vLLM's max_model_len
    with pytest.raises(ServerError, match="does not serve 'other'"):
        FlashBackModel.from_server(str(exported), remote.backend.url, served_model="other")


def test_langchain_and_llama_index_run_on_vllm(both, exported, server) -> None:
    from flashback_integrations.langchain import FlashBackLLM as LangChainLLM
    from flashback_integrations.llama_index import FlashBackLLM

    settings = {"model": str(exported), "retriever": HashRetriever(), "max_tokens": 10, "stride": 4}
    settings.update(query_tokens=8, num_passages=1, max_doc_tokens=12)
    on_vllm = LangChainLLM(**settings, backend="openai", server_url=server)
    assert on_vllm.invoke(PROMPT) == LangChainLLM(**settings).invoke(PROMPT)
    assert FlashBackLLM(**settings, backend="openai", server_url=server).complete(PROMPT).text == (
        FlashBackLLM(**settings).complete(PROMPT).text
    )


@pytest.mark.parametrize(
    ("prefix_caching", "details", "warning"),
    [(False, True, "prefix caching looks off"), (True, False, "reports no cached prompt tokens")],
)
def test_a_vllm_without_prefix_caching_or_its_counts_is_warned_about_once(exported, prefix_caching, details, warning):
    with vllm_server(exported, max_model_len=512, prefix_caching=prefix_caching, report_cached=details,
                     extra=["--block-size", str(BLOCK)]) as url:  # fmt: skip
        remote = FlashBackModel.from_server(str(exported), url)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                _run(remote, "append")
        assert len([w for w in caught if warning in str(w.message)]) == 1
