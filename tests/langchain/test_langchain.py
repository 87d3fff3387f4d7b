"""FlashBackLLM and ChatFlashBack in LangChain: calls, streaming, stop, chains, runs and events."""

from __future__ import annotations

import asyncio

import pytest
from langchain_chroma import Chroma
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.tracers.context import collect_runs
from tiny import HashRetriever, save_tiny_chat_model

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.langchain import ChatFlashBack, FlashBackCallbackHandler, FlashBackLLM
from flashback_integrations.store import connect

SETTINGS = {"stride": 4, "query_tokens": 8, "max_doc_tokens": 12, "max_tokens": 10}
CONFIG = FlashBackConfig(stride=4, query_tokens=8, max_doc_tokens=12)
TEXTS = [
    "The json module encodes Python objects as JSON text.",
    "asyncio.gather runs coroutines concurrently.",
    "The http.server module serves files over HTTP.",
]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def fb(tiny_path) -> FlashBackModel:
    return FlashBackModel.shared(tiny_path)


@pytest.fixture
def llm(tiny_path) -> FlashBackLLM:
    return FlashBackLLM(model=tiny_path, retriever=HashRetriever(), **SETTINGS)


def engine_text(fb: FlashBackModel, prompt: str, **kw) -> str:
    return fb.generate(prompt, HashRetriever(), config=CONFIG, max_new_tokens=10, **kw).text


def test_invoke_batch_stream_and_async_agree_with_the_engine(llm, fb) -> None:
    expected = engine_text(fb, "The json module")
    assert llm.invoke("The json module") == expected  # no prompt echo
    assert llm.batch(["The json module", "Regular expressions"]) == [expected, engine_text(fb, "Regular expressions")]
    assert "".join(llm.stream("The json module")) == expected
    assert asyncio.run(llm.ainvoke("The json module")) == expected

    async def collect() -> str:
        return "".join([c async for c in llm.astream("The json module")])

    assert asyncio.run(collect()) == expected


def test_stop_cuts_exactly_and_usage_is_reported(llm, fb) -> None:
    full = engine_text(fb, "The json module")
    stop = full[3:6]
    assert llm.invoke("The json module", stop=[stop]) == full[: full.index(stop)]
    assert "".join(llm.stream("The json module", stop=[stop])) == full[: full.index(stop)]
    result = llm.generate(["The json module"])
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 10 and usage["prompt_tokens"] == len(fb.encode("The json module"))
    info = result.generations[0][0].generation_info
    assert [r["step"] for r in info["retrievals"]] == [0, 4, 8]


def test_threads_give_sequential_outputs(llm) -> None:
    prompts = ["The json module", "Regular expressions", "cache token", "HTTP servers", "asyncio"]
    sequential = [llm.invoke(p) for p in prompts]
    assert llm.batch(prompts, config={"max_concurrency": 5}) == sequential


def test_instances_share_weights(tiny_path) -> None:
    models = [ChatFlashBack(model=tiny_path, **SETTINGS) for _ in range(10)]
    assert len({id(m.flashback()) for m in models}) == 1
    assert models[0].flashback() is FlashBackModel.shared(tiny_path)


def test_retrievals_are_child_retriever_runs_with_custom_events(llm) -> None:
    handler = FlashBackCallbackHandler()
    with collect_runs() as cb:
        llm.invoke("The json module", config={"callbacks": [handler]})
    (run,) = cb.traced_runs
    assert run.run_type == "llm"
    children = [c for c in run.child_runs if c.run_type == "retriever"]
    assert len(children) == 3
    assert [c.inputs["query"] for c in children] == [r["query"] for r in handler.retrievals]
    assert all(c.outputs["documents"] for c in children)
    assert [r["step"] for r in handler.retrievals] == [0, 4, 8]
    assert all(r["run_id"] == run.id and r["block_tokens"] > 0 for r in handler.retrievals)


def test_lcel_chain_over_langchain_chroma_with_nested_runs(tiny_path, tmp_path) -> None:
    store = Chroma.from_texts(
        TEXTS,
        embedding=DeterministicFakeEmbedding(size=16),
        client=connect(tmp_path / "db"),
        collection_name="lc-texts",
    )
    llm = FlashBackLLM(model=tiny_path, retriever=store.as_retriever(search_kwargs={"k": 1}), **SETTINGS)
    chain = PromptTemplate.from_template("Question: {q}\nAnswer:") | llm | StrOutputParser()
    with collect_runs() as cb:
        answer = chain.invoke({"q": "what does json do?"})
    assert isinstance(answer, str) and answer
    (root,) = cb.traced_runs
    llm_run = next(c for c in root.child_runs if c.run_type == "llm")
    retrieval_runs = [c for c in llm_run.child_runs if c.run_type == "retriever"]
    assert len(retrieval_runs) == 3
    for run in retrieval_runs:
        assert run.parent_run_id == llm_run.id and run.trace_id == root.trace_id
        assert run.outputs["documents"][0].page_content in TEXTS

    async def events() -> list[dict]:
        return [e async for e in chain.astream_events({"q": "what does json do?"}, version="v2")]

    seen = asyncio.run(events())
    llm_start = next(e for e in seen if e["event"] == "on_llm_start")
    retrievers = [e for e in seen if e["event"] == "on_retriever_end"]
    customs = [e for e in seen if e["event"] == "on_custom_event" and e["name"] == "flashback_retrieval"]
    assert len(retrievers) == len(customs) == 3
    assert all(llm_start["run_id"] in e["parent_ids"] for e in retrievers)
    assert [e["data"]["step"] for e in customs] == [0, 4, 8]
    streamed = "".join(e["data"]["chunk"].text for e in seen if e["event"] == "on_llm_stream")
    assert streamed == answer


def test_chat_model_first_query_is_the_last_user_message(tiny_path) -> None:
    retriever = HashRetriever()
    chat = ChatFlashBack(model=tiny_path, retriever=retriever, **SETTINGS)
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("first question"),
        AIMessage("ok"),
        HumanMessage("How do I pretty-print JSON?"),
    ]
    reply = chat.invoke(messages)
    assert retriever.calls[0][0] == "How do I pretty-print JSON?"
    assert reply.usage_metadata["output_tokens"] == 10
    assert [r["step"] for r in reply.response_metadata["retrievals"]] == [0, 4, 8]
    chunks = list(chat.stream(messages))
    assert "".join(c.content for c in chunks) == reply.content
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == 10


def test_chat_without_retriever_is_a_plain_local_model(tiny_path, fb) -> None:
    chat = ChatFlashBack(model=tiny_path, **SETTINGS)
    reply = chat.invoke("hello")
    assert reply.response_metadata["retrievals"] == []
    ids = fb.chat_ids([{"role": "user", "content": "hello"}])
    assert reply.content == fb.generate(ids, config=CONFIG.replace(mode="none"), max_new_tokens=10).text


def test_bad_settings_fail_at_construction(tiny_path) -> None:
    with pytest.raises(ValueError, match="stride must be a positive integer"):  # pydantic ValidationError
        FlashBackLLM(model=tiny_path, stride=0)
    with pytest.raises(ValueError, match="mode='sideways' is not one of"):
        ChatFlashBack(model=tiny_path, mode="sideways")
    with pytest.raises(ValueError, match="dtype 'float99' is not one of"):
        ChatFlashBack(model=tiny_path, dtype="float99")
    with pytest.raises(ValueError, match="not a torch device"):
        FlashBackLLM(model=tiny_path, device="gpu0")


def test_chat_streaming_keeps_retrievals_inside_the_model_run(tiny_path) -> None:
    chat = ChatFlashBack(model=tiny_path, retriever=HashRetriever(), **SETTINGS)
    chain = PromptTemplate.from_template("{q}") | chat | StrOutputParser()
    handler = FlashBackCallbackHandler()
    with collect_runs() as cb:
        streamed = "".join(chain.stream({"q": "json"}, config={"callbacks": [handler]}))
    (root,) = cb.traced_runs
    model_run = next(c for c in root.child_runs if c.run_type == "llm")
    # the question's passages (the chat default, question_passages=1), then one retrieval per stride
    assert [c.run_type for c in model_run.child_runs] == ["retriever"] * 4
    assert model_run.child_runs[0].inputs["query"] == "json"
    assert [r["run_id"] for r in handler.retrievals] == [model_run.id] * 3
    assert streamed == chain.invoke({"q": "json"})

    async def events() -> list[dict]:
        return [e async for e in chain.astream_events({"q": "json"}, version="v2")]

    seen = asyncio.run(events())
    start = next(e for e in seen if e["event"] == "on_chat_model_start")
    retrievals = [e for e in seen if e["event"] == "on_retriever_end"]
    assert len(retrievals) == 4 and all(start["run_id"] in e["parent_ids"] for e in retrievals)
    assert "".join(e["data"]["chunk"].content for e in seen if e["event"] == "on_chat_model_stream") == streamed


def test_per_call_options_override_and_unknown_ones_fail(llm, fb) -> None:
    short = llm.generate(["The json module"], max_tokens=3).generations[0][0].generation_info
    assert short["completion_tokens"] == 3
    with_stride = llm.generate(["The json module"], stride=5).generations[0][0].generation_info
    assert [r["step"] for r in with_stride["retrievals"]] == [0, 5]
    with pytest.raises(ValueError, match=r"a call takes no argument 'tempreature'; did you mean 'temperature'"):
        llm.invoke("The json module", tempreature=0.5)


def test_langchain_base_initialisation_is_kept(tiny_path) -> None:
    chat = ChatFlashBack(model=tiny_path, **SETTINGS)
    assert "langchain-core" in (chat.metadata or {}).get("lc_versions", {})


def test_chat_model_in_the_isolated_layout_reports_what_each_retrieval_cost(tiny_path, fb) -> None:
    chat = ChatFlashBack(model=tiny_path, retriever=HashRetriever(), mode="isolated", tail_tokens=2, **SETTINGS)
    handler = FlashBackCallbackHandler()
    message = chat.invoke([HumanMessage("The json module")], config={"callbacks": [handler]})
    ids = fb.chat_ids([{"role": "user", "content": "The json module"}])
    expected = fb.generate(
        ids, HashRetriever(), config=CONFIG.replace(mode="isolated", tail_tokens=2), max_new_tokens=10
    )
    assert message.content == expected.text
    assert [r["step"] for r in handler.retrievals] == [0, 4, 8]
    assert all(r["segments_computed"] + r["segments_reused"] == 1 for r in handler.retrievals)
    assert all(r["prefill_tokens"] == 4 + 2 for r in handler.retrievals[1:])
    assert "".join(c.content for c in chat.stream([HumanMessage("The json module")])) == expected.text
    with pytest.raises(ValueError, match="tail_tokens"):
        ChatFlashBack(model=tiny_path, mode="isolated", tail_tokens=0)


@pytest.mark.parametrize("messages", ([], [HumanMessage(content=[{"type": "image_url", "image_url": "x"}])]))
def test_chat_without_text_is_a_clear_error(tiny_path, messages) -> None:
    from flashback_integrations import ConfigError

    chat = ChatFlashBack(model=tiny_path, retriever=HashRetriever(), **SETTINGS)
    with pytest.raises(ConfigError):
        chat.invoke(messages)
