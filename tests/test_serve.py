"""`flashback serve` through the clients people point at it: the official openai SDK and LangChain's
ChatOpenAI, against a server started on a free loopback port. Same text as ChatFlashBack for the same
settings, retrievals reported, tools and structured output parsed; bad input answered 4xx; load, hung
and failing retrievers, disconnects and SIGTERM handled."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI
from pydantic import BaseModel
from serve_helpers import SlowRetriever, running
from tiny import HashRetriever, make_chat_model, save_tiny_tools_model

from flashback_integrations import FlashBackConfig, FlashBackModel
from flashback_integrations.langchain import ChatFlashBack
from flashback_integrations.serve import ServeSettings, create_app

CONFIG = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=24)
QUESTION = "What does the retrieval augmented model do?"


@pytest.fixture(scope="module")
def fb() -> FlashBackModel:
    model, tok = make_chat_model("llama")
    return FlashBackModel(model, tok, name="tiny")


@pytest.fixture(scope="module")
def retriever() -> HashRetriever:
    return HashRetriever()


@pytest.fixture(scope="module")
def base_url(fb, retriever):
    retrievers = {"docs": retriever, "slow": SlowRetriever(delay=0.05), "down": SlowRetriever(fail=True)}
    app = create_app(
        fb, ServeSettings(model_name="tiny", parallel=4, max_queue=40), config=CONFIG,
        retrievers=retrievers, default_collection="docs",
    )  # fmt: skip
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def reference(fb, retriever, **kwargs) -> ChatFlashBack:
    fields = {"mode": CONFIG.mode, "stride": CONFIG.stride, "query_tokens": CONFIG.query_tokens}
    fields |= {"num_passages": CONFIG.num_passages, "max_doc_tokens": CONFIG.max_doc_tokens}
    return ChatFlashBack(flashback_model=fb, retriever=retriever, **{**fields, **kwargs})


def test_openai_sdk_gets_chatflashbacks_text_and_retrievals(fb, retriever, client) -> None:
    expected = reference(fb, retriever, max_tokens=20).invoke(QUESTION)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=20, temperature=0
    )
    assert reply.choices[0].message.content == expected.content
    assert reply.usage.completion_tokens == expected.usage_metadata["output_tokens"]
    served = reply.model_extra["flashback"]["retrievals"]
    ours = expected.response_metadata["retrievals"]
    assert [(r["step"], r["query"], r["passage_ids"]) for r in served] == [
        (r["step"], r["query"], r["passage_ids"]) for r in ours
    ]
    assert len(served) == 5 and served[0]["query"] == QUESTION  # every 4 of 20 tokens; first by the question
    assert reply.model_extra["flashback"]["mode"] == "append"


def test_streamed_chunks_join_to_the_same_text_with_retrievals_as_events(fb, retriever, client, base_url) -> None:
    expected = reference(fb, retriever, max_tokens=17).invoke(QUESTION)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=17, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.content
    extras = [(c.model_extra or {}).get("flashback", {}) for c in chunks]
    retrievals = [x["retrieval"] for x in extras if "retrieval" in x]
    assert [r["step"] for r in retrievals] == [0, 4, 8, 12, 16]
    assert chunks[-1].usage.completion_tokens == 17 and chunks[-2].choices[0].finish_reason == "length"
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5, "stream": True,
    }) as raw:  # fmt: skip
        lines = [line for line in raw.iter_lines() if line]
    assert lines.count("event: flashback.retrieval") == 2 and lines[-1] == "data: [DONE]"


def test_langchain_chatopenai_gets_the_same_answers(fb, retriever, base_url) -> None:
    expected = reference(fb, retriever, max_tokens=12).invoke(QUESTION)
    llm = ChatOpenAI(model="tiny", base_url=base_url + "/v1", api_key="unused", max_tokens=12, temperature=0)
    assert llm.invoke(QUESTION).content == expected.content
    assert "".join(c.content for c in llm.stream(QUESTION)) == expected.content
    # FlashBack settings per request, through extra_body: no retrieval is the plain model's answer
    plain = ChatOpenAI(
        model="tiny", base_url=base_url + "/v1", api_key="unused", max_tokens=12, temperature=0,
        extra_body={"flashback": {"mode": "none"}},
    )  # fmt: skip
    assert plain.invoke(QUESTION).content == reference(fb, None, max_tokens=12, mode="none").invoke(QUESTION).content


def test_completions_and_logprobs(fb, retriever, client) -> None:
    expected = fb.generate("The cache of the input", retriever, config=CONFIG, max_new_tokens=10)
    reply = client.completions.create(model="tiny", prompt="The cache of the input", max_tokens=10, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert len(choice.logprobs.tokens) == 10 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0
    streamed = client.completions.create(model="tiny", prompt="The cache of the input", max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)


def test_models_health_and_metrics(client, base_url) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"
    text = httpx.get(base_url + "/metrics").text
    for name in ("flashback_requests_total", "flashback_retrievals_total", "flashback_queue_depth",
                 "flashback_time_to_first_token_seconds_bucket", "flashback_passage_cache_segments_total"):  # fmt: skip
        assert name in text


# ---------------------------------------------------------------- tools and structured output
class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    sunny: bool


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tools_url(tmp_path_factory):
    path = save_tiny_tools_model(tmp_path_factory.mktemp("tools"))
    tools_fb = FlashBackModel.from_pretrained(path)
    app = create_app(tools_fb, ServeSettings(model_name="tools", max_tokens=120), config=FlashBackConfig(mode="none"))
    with running(app) as url:
        yield url


def test_tool_calls_and_structured_output_parse(tools_url) -> None:
    client = openai.OpenAI(base_url=tools_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
        tool_choice="required",
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    # the result goes back as a tool message, as agents send it
    follow = client.chat.completions.create(
        model="tools", max_tokens=8, tools=[WEATHER_TOOL], tool_choice="none", messages=[
            {"role": "user", "content": "Weather in Paris?"}, reply.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
        ],
    )  # fmt: skip
    assert follow.choices[0].message.tool_calls is None
    llm = ChatOpenAI(model="tools", base_url=tools_url + "/v1", api_key="unused", temperature=0, max_tokens=120)
    message = llm.bind_tools([WEATHER_TOOL], tool_choice="any").invoke("Weather in Rome?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    streamed = None
    for chunk in llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather").stream("Weather?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    parsed = llm.with_structured_output(Weather, method="json_schema").invoke("Weather in Rome?")
    assert isinstance(parsed, Weather)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    strict = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert set(json.loads(strict.choices[0].message.content)) == {"ok"}
    # any object: a random model never closes its first key, but the grammar opens the object
    loose = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "JSON"}], response_format={"type": "json_object"},
        max_tokens=5,
    )  # fmt: skip
    assert loose.choices[0].message.content.startswith("{")


# ---------------------------------------------------------------- bad input
BAD = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]}, 404),
    ({"model": "tiny", "messages": []}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": -3}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "frobnicate": True}, 400),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "flashback": {"collection": "nope"}}, 404),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "flashback": {"stride": 0}}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "flashback": {"strides": 4}}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a " * 3000}]}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 100000}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 3}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "presence_penalty": 1.0}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": -1}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "seed": -1}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 3}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "response_format": {"type": "xml"}}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": 7}}}}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, 400),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}], "tools": [WEATHER_TOOL],
      "tool_choice": "nah"}, 400),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status"), BAD)
def test_bad_requests_get_openai_error_bodies_and_the_server_keeps_serving(base_url, body, status) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base_url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in r.text
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_the_sdk_raises_its_own_error_classes(client) -> None:
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "b " * 3000}])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["model", "messages", "max_tokens", "temperature", "stop", "seed", "tools", "tool_choice", "response_format",
     "flashback", "logprobs", "top_logprobs", "stream", "n", "prompt"]
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    extra=st.dictionaries(FIELDS, JSON, max_size=5),
    endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)
def test_random_bodies_never_give_a_500(base_url, extra, endpoint) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 3, **extra}
    content = json.dumps(body).encode()  # NaN and Infinity included, as Python's json writes them
    r = httpx.post(base_url + endpoint, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


# ---------------------------------------------------------------- load and faults
MIXED = [
    ({"mode": "append", "stride": 3}, 9),
    ({"mode": "prepend", "stride": 5}, 12),
    ({"mode": "isolated", "stride": 4, "tail": 2}, 10),
    ({"mode": "none"}, 7),
]


def test_32_concurrent_streams_of_mixed_settings_match_sequential_calls(base_url) -> None:
    def call(i: int) -> str:
        options, tokens = MIXED[i % len(MIXED)]
        body = {
            "model": "tiny", "messages": [{"role": "user", "content": f"Question {i % 8} about caches"}],
            "max_tokens": tokens, "stream": True, "flashback": options,
        }  # fmt: skip
        pieces = []
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
        return "".join(pieces)

    sequential = [call(i) for i in range(8)]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(call, range(32)))
    assert concurrent == [sequential[i % 8] for i in range(32)]


def test_a_full_queue_answers_429_with_retry_after(fb) -> None:
    slow = SlowRetriever(delay=1.0)
    app = create_app(fb, ServeSettings(model_name="tiny", parallel=1, max_queue=0), config=CONFIG,
                     retrievers={"slow": slow}, default_collection="slow")  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with running(app) as url:
        kwargs = {"json": body, "timeout": 60}
        first = threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",), kwargs=kwargs)
        first.start()
        time.sleep(0.5)
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        first.join()
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_a_client_that_disconnects_frees_its_slot(fb) -> None:
    slow = SlowRetriever(delay=0.2)
    app = create_app(fb, ServeSettings(model_name="tiny", parallel=1, max_queue=0), config=CONFIG,
                     retrievers={"slow": slow}, default_collection="slow")  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            next(r.iter_lines())  # the first chunk, then hang up
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
        assert "flashback_cancelled_total 1.0" in httpx.get(url + "/metrics").text
        quick = {**body, "stream": False, "max_tokens": 4}
        assert httpx.post(url + "/v1/chat/completions", json=quick, timeout=60).status_code == 200


def test_failing_and_hung_retrievers_follow_the_policy_without_blocking_others(fb) -> None:
    hung = SlowRetriever(hang=True)
    app = create_app(
        fb, ServeSettings(model_name="tiny", parallel=2, max_queue=4),
        config=CONFIG.replace(retrieval_timeout=3.0, on_retrieval_error="skip"),
        retrievers={"docs": HashRetriever(), "down": SlowRetriever(fail=True), "hung": hung},
    )  # fmt: skip
    client_kw = {"timeout": 60}

    def ask(collection: str, **options) -> httpx.Response:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "flashback": {"collection": collection, **options}}  # fmt: skip
        return httpx.post(url + "/v1/chat/completions", json=body, **client_kw)

    with running(app) as url:
        skipped = ask("down").json()["flashback"]["retrievals"]
        assert all("the store is down" in r["error"] for r in skipped)
        raised = ask("down", on_retrieval_error="raise")
        assert raised.status_code == 502 and "Retriever failed" in raised.json()["error"]["message"]
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(ask, "hung")
            time.sleep(0.2)
            started = time.monotonic()
            fast = ask("docs")
            fast_s = time.monotonic() - started
            result = slow.result()
        assert fast.status_code == 200 and fast_s < 2.5  # not behind the hung retrieval (3 s)
        assert result.status_code == 200
        flashback = result.json()["flashback"]  # the question's retrieval (the chat default) timed out first
        assert "retrieval_timeout" in flashback["question_retrieval"]["error"]
        assert "timed out" in flashback["retrievals"][0]["error"]
        hung.release.set()


def test_api_key_is_required_when_set(fb) -> None:
    app = create_app(fb, ServeSettings(model_name="tiny", api_key="s3cret"), config=FlashBackConfig(mode="none"))
    with running(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2)
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
