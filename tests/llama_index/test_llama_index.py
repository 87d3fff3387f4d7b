"""FlashBack in LlamaIndex: the LLM, the stock query engine, FlashBackQueryEngine, and retrieval events."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
from llama_index.core.llms import ChatMessage
from llama_index.vector_stores.chroma import ChromaVectorStore
from tiny import HashRetriever, save_tiny_chat_model

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.llama_index import (
    FlashBackEmbedding,
    FlashBackLLM,
    FlashBackQueryEngine,
    FlashBackRetrievalEvent,
)
from flashback_integrations.store import connect

SETTINGS = {"stride": 4, "query_tokens": 8, "max_doc_tokens": 12, "max_tokens": 10}
CONFIG = FlashBackConfig(stride=4, query_tokens=8, max_doc_tokens=12)
DOCS = {
    "json.txt": "The json module encodes Python objects as JSON text; json.dumps(indent=2) pretty-prints.",
    "asyncio.txt": "asyncio.gather runs several coroutines concurrently and returns their results.",
    "http.txt": "python -m http.server serves the files of the current directory over HTTP.",
}


class Capture(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Capture"

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), positions=4096)


@pytest.fixture(scope="module")
def fb(tiny_path) -> FlashBackModel:
    return FlashBackModel.shared(tiny_path)


@pytest.fixture
def capture():
    handler = Capture(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> VectorStoreIndex:
    client = connect(tmp_path_factory.mktemp("db"))
    store = ChromaVectorStore(chroma_collection=client.get_or_create_collection("li-docs"))
    return VectorStoreIndex.from_documents(
        [Document(text=t, metadata={"name": n}) for n, t in DOCS.items()],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=FlashBackEmbedding(),
    )


def test_complete_chat_stream_and_async_agree_with_the_engine(tiny_path, fb) -> None:
    llm = FlashBackLLM(model=tiny_path, retriever=HashRetriever(), **SETTINGS)
    expected = fb.generate("The json module", HashRetriever(), config=CONFIG, max_new_tokens=10).text
    assert llm.complete("The json module").text == expected
    streamed = list(llm.stream_complete("The json module"))
    assert streamed[-1].text == "".join(r.delta for r in streamed) == expected
    assert asyncio.run(llm.acomplete("The json module")).text == expected
    messages = [ChatMessage(role="user", content="How do I pretty-print JSON?")]
    ids = fb.chat_ids([{"role": "user", "content": "How do I pretty-print JSON?"}])
    chat_expected = fb.generate(
        ids, HashRetriever(), config=CONFIG, max_new_tokens=10, first_query="How do I pretty-print JSON?"
    ).text
    assert llm.chat(messages).message.content == chat_expected
    assert list(llm.stream_chat(messages))[-1].message.content == chat_expected
    assert asyncio.run(llm.achat(messages)).message.content == chat_expected


def test_metadata_leaves_room_for_the_retrieval_block(tiny_path, fb) -> None:
    with_retrieval = FlashBackLLM(model=tiny_path, retriever=HashRetriever(), num_passages=2, **SETTINGS).metadata
    plain = FlashBackLLM(model=tiny_path, **SETTINGS).metadata
    assert plain.context_window == fb.context_window
    assert with_retrieval.context_window == fb.context_window - (2 * 12 + 2)
    assert with_retrieval.num_output == 10 and with_retrieval.is_chat_model


def test_stock_query_engine_with_and_without_periodic_retrieval(tiny_path, index) -> None:
    retriever = index.as_retriever(similarity_top_k=2)
    for llm in (
        FlashBackLLM(model=tiny_path, **SETTINGS),
        FlashBackLLM(model=tiny_path, retriever=retriever, **SETTINGS),
    ):
        engine = VectorStoreIndex.from_vector_store(
            index.vector_store, embed_model=FlashBackEmbedding()
        ).as_query_engine(llm=llm, similarity_top_k=2)
        response = engine.query("How do I pretty-print JSON?")
        assert isinstance(response.response, str) and response.response
        assert {n.node.metadata["name"] for n in response.source_nodes} <= set(DOCS)
    assert Settings._llm is None and Settings._embed_model is None  # nothing fell back to OpenAI


def test_flashback_query_engine_reports_every_retrieved_node(tiny_path, index, fb, capture) -> None:
    retriever = index.as_retriever(similarity_top_k=2)
    llm = FlashBackLLM(model=tiny_path, num_passages=2, question_passages=0, **SETTINGS)
    engine = FlashBackQueryEngine(retriever=retriever, llm=llm)
    response = engine.query("How do I pretty-print JSON?")
    ids = fb.chat_ids([{"role": "user", "content": "How do I pretty-print JSON?"}])
    assert (
        response.response
        == fb.generate(
            ids,
            retriever,
            config=CONFIG.replace(num_passages=2),
            max_new_tokens=10,
            first_query="How do I pretty-print JSON?",
        ).text
    )
    steps = [n.node.metadata["flashback_step"] for n in response.source_nodes]
    assert steps == [0, 0, 4, 4, 8, 8]
    assert response.source_nodes[0].node.metadata["name"] == "json.txt"  # the question retrieved first
    assert all("flashback_step" not in n.node.metadata for n in retriever.retrieve("json"))  # copies
    events = [e for e in capture.events if isinstance(e, FlashBackRetrievalEvent)]
    assert [e.step for e in events] == [0, 4, 8]
    assert events[0].query == "How do I pretty-print JSON?"
    assert [n.node.node_id for n in response.source_nodes[:2]] == events[0].node_ids

    streaming = FlashBackQueryEngine(retriever=retriever, llm=llm, streaming=True).query("How do I pretty-print JSON?")
    assert "".join(streaming.response_gen) == response.response
    assert [n.node.metadata["flashback_step"] for n in streaming.source_nodes] == steps


def test_flashback_query_engine_puts_the_questions_nodes_in_the_prompt_by_default(tiny_path, index, fb) -> None:
    """The chat default (question_passages=1 with a retriever): the question's top nodes go into the user turn, as
    a stuff chain puts them, and lead ``source_nodes``; periodic retrieval goes on after them."""
    from flashback_integrations.chat import prepare_chat

    retriever = index.as_retriever(similarity_top_k=2)
    question = "How do I pretty-print JSON?"
    response = FlashBackQueryEngine(retriever=retriever, llm=FlashBackLLM(model=tiny_path, **SETTINGS)).query(question)
    call = prepare_chat(fb, [{"role": "user", "content": question}], retriever=retriever, config=CONFIG)
    assert "Context:\n" in fb.tokenizer.decode(call.prompt_ids) and call.question.query == question
    expected = fb.generate(
        call.prompt_ids, retriever, config=CONFIG.replace(question_passages=0), max_new_tokens=10, first_query=question
    )
    assert response.response == expected.text
    steps = [n.node.metadata["flashback_step"] for n in response.source_nodes]
    assert steps == [0, 0, 4, 8]  # the question's node (top-1), then one per stride
    assert response.source_nodes[0].node.get_content() == call.question.passages[0].text
    assert response.source_nodes[0].node.metadata["name"] == "json.txt"


def test_events_carry_the_llm_span_even_when_streaming(tiny_path, capture) -> None:
    llm = FlashBackLLM(model=tiny_path, retriever=HashRetriever(), **SETTINGS)
    llm.complete("The json module")
    list(llm.stream_complete("Regular expressions"))
    list(llm.stream_chat([ChatMessage(role="user", content="hi")]))
    starts = [e for e in capture.events if isinstance(e, (LLMCompletionStartEvent, LLMChatStartEvent))]
    ours = [e for e in capture.events if isinstance(e, FlashBackRetrievalEvent)]
    assert len(starts) == 3 and len(ours) == 9
    for i, start in enumerate(starts):
        assert start.span_id is not None
        assert {e.span_id for e in ours[3 * i : 3 * i + 3]} == {start.span_id}


def test_legacy_callback_manager_sees_retrieve_events(tiny_path) -> None:
    debug = LlamaDebugHandler()
    llm = FlashBackLLM(
        model=tiny_path, retriever=HashRetriever(), callback_manager=CallbackManager([debug]), **SETTINGS
    )
    llm.complete("The json module")
    pairs = debug.get_event_pairs(CBEventType.RETRIEVE)
    assert len(pairs) == 3
    assert pairs[0][0].payload["query_str"] == "The json module"
    assert len(pairs[0][1].payload["nodes"]) == 1


def test_query_engine_refuses_mode_none(tiny_path, index) -> None:
    with pytest.raises(ValueError, match="mode"):
        FlashBackQueryEngine(retriever=index.as_retriever(), llm=FlashBackLLM(model=tiny_path, mode="none"))


def test_query_engine_in_the_isolated_layout(tiny_path, index, fb, capture) -> None:
    retriever = index.as_retriever(similarity_top_k=2)
    llm = FlashBackLLM(model=tiny_path, num_passages=2, mode="isolated", **SETTINGS)
    response = FlashBackQueryEngine(retriever=retriever, llm=llm).query("How do I pretty-print JSON?")
    ids = fb.chat_ids([{"role": "user", "content": "How do I pretty-print JSON?"}])
    config = CONFIG.replace(num_passages=2, mode="isolated")
    expected = fb.generate(ids, retriever, config=config, max_new_tokens=10, first_query="How do I pretty-print JSON?")
    assert response.response == expected.text
    events = [e for e in capture.events if isinstance(e, FlashBackRetrievalEvent)]
    assert [e.step for e in events] == [0, 4, 8]
    assert all(e.segments_computed + e.segments_reused == 2 for e in events)
