"""ChatFlashBack for agent builders: tool calling (template-rendered, grammar-forced, streamed, fed
back), structured output, JSON mode and logprobs, on a tiny random Qwen2-style model with a
tools-capable template. A random model writes nonsense, so every call that must parse is forced by
the grammar; that it parses anyway is the point."""

from __future__ import annotations

import json
import math
from typing import Literal

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from tiny import HashRetriever, save_tiny_tools_model
from typing_extensions import TypedDict

from flashback_integrations import FlashBackConfig, FlashBackModel, TokenEvent
from flashback_integrations.errors import ConfigError
from flashback_integrations.langchain import ChatFlashBack


@tool
def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


@tool
def add(a: int = Field(ge=0, le=99), b: int = Field(ge=0, le=99)) -> int:
    """Add two small numbers."""
    return a + b


class Answer(BaseModel):
    """An answer and how sure the model is."""

    label: Literal["yes", "no"]
    sure: bool
    score: int = Field(ge=0, le=9)


class AnswerDict(TypedDict):
    label: Literal["yes", "no"]
    sure: bool


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory) -> str:
    return save_tiny_tools_model(tmp_path_factory.mktemp("tiny-tools"))


@pytest.fixture(scope="module")
def chat(tools_dir) -> ChatFlashBack:
    return ChatFlashBack(model=tools_dir, mode="none", max_tokens=160)


def test_forced_call_parses_into_tool_calls(chat) -> None:
    message = chat.bind_tools([get_weather, add], tool_choice="any").invoke("Weather in Paris?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    (call,) = message.tool_calls
    assert call["name"] in ("get_weather", "add") and call["id"]
    assert message.invalid_tool_calls == []
    if call["name"] == "get_weather":
        assert call["args"]["city"] in ("Paris", "Rome")
    named = chat.bind_tools([get_weather, add], tool_choice="add").invoke("2 + 3?")
    (call,) = named.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    assert all(0 <= v <= 99 for v in call["args"].values())


def test_parallel_calls_only_when_asked(chat) -> None:
    one = chat.bind_tools([add], tool_choice="required").invoke("sum")
    assert len(one.tool_calls) == 1


def test_streamed_call_arrives_as_tool_call_chunks_and_aggregates_to_the_same_call(chat) -> None:
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(bound.stream("Weather in Rome?"))
    assert any(c.tool_call_chunks for c in chunks)
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    invoked = bound.invoke("Weather in Rome?")
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]


def test_tools_and_results_go_through_the_template(chat, tools_dir) -> None:
    fb = chat.flashback()
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("Sunny in Paris", tool_call_id="c1"),
    ]
    from flashback_integrations.langchain._messages import to_chat_messages

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = fb.tokenizer.decode(fb.chat_ids(to_chat_messages(history), tools=tools))
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nSunny in Paris\n</tool_response>" in text
    # the turn after a tool result is a normal answer (tool_choice="none": text, nothing parsed)
    answer = chat.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert answer.tool_calls == [] and isinstance(answer.content, str)


def test_template_without_tool_support_gets_a_system_message(tmp_path) -> None:
    from tiny import save_tiny_chat_model

    path = save_tiny_chat_model(tmp_path / "plain", arch="qwen2", marks=False, positions=2048)
    chat = ChatFlashBack(model=path, mode="none", max_tokens=160)
    fb = chat.flashback()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = fb.tokenizer.decode(fb.chat_ids([{"role": "user", "content": "hi"}], tools=tools))
    assert text.startswith("<s>system\nYou may call these tools:")
    message = chat.bind_tools([get_weather], tool_choice="any").invoke("Weather?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]


def test_react_agent_calls_the_tool_and_answers(chat) -> None:
    import warnings

    from langgraph.prebuilt import create_react_agent

    calls = []

    @tool
    def lookup(city: Literal["Paris", "Rome"]) -> str:
        """Look up a city."""
        calls.append(city)
        return f"{city} is sunny"

    def model(state, runtime):  # forced call first, then an answer from the tool's result
        done = any(isinstance(m, ToolMessage) for m in state["messages"])
        return chat.bind_tools([lookup], tool_choice="none" if done else "any")

    with warnings.catch_warnings():  # moved to langchain.agents (not installed here); the issue names this one
        warnings.simplefilter("ignore")
        agent = create_react_agent(model, [lookup])
    result = agent.invoke({"messages": [HumanMessage("How is Paris?")]}, {"recursion_limit": 6})
    kinds = [type(m).__name__ for m in result["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert len(calls) == 1 and result["messages"][2].content == f"{calls[0]} is sunny"
    assert result["messages"][-1].tool_calls == []


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_always_validates(chat, method) -> None:
    answer = chat.with_structured_output(Answer, method=method).invoke("Is the sky blue?")
    assert isinstance(answer, Answer)
    as_dict = chat.with_structured_output(AnswerDict, method=method).invoke("Is water wet?")
    assert set(as_dict) == {"label", "sure"} and as_dict["label"] in ("yes", "no")
    schema = Answer.model_json_schema()
    raw = chat.with_structured_output(schema, method=method, include_raw=True).invoke("Is it?")
    assert raw["parsing_error"] is None and Answer.model_validate(raw["parsed"])
    assert isinstance(raw["raw"], AIMessage)


def test_json_mode_gives_a_json_object(chat) -> None:
    message = chat.bind(response_format={"type": "json_object"}).invoke("Reply in JSON.", max_tokens=400)
    if message.response_metadata["finish_reason"] == "eos":
        assert isinstance(json.loads(message.content), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert message.content.startswith("{")


def test_retrieval_keeps_working_under_a_grammar(tools_dir) -> None:
    chat = ChatFlashBack(
        model=tools_dir, retriever=HashRetriever(), mode="isolated", stride=4, max_doc_tokens=16, max_tokens=160
    )
    message = chat.with_structured_output(Answer, include_raw=True).invoke("Is the sky blue?")
    assert message["parsing_error"] is None
    assert len(message["raw"].response_metadata["retrievals"]) >= 2


def test_logprobs_are_the_models_own_distribution_in_openai_format(chat) -> None:
    message = chat.invoke("Hello", logprobs=True, top_logprobs=3, max_tokens=6)
    content = message.response_metadata["logprobs"]["content"]
    assert len(content) == message.usage_metadata["output_tokens"]
    fb = chat.flashback()
    prompt = fb.chat_ids([{"role": "user", "content": "Hello"}])
    events = fb.stream(prompt, config=FlashBackConfig(mode="none"), max_new_tokens=6, output_logits=True)
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    for entry, event in zip(content, tokens, strict=True):
        logp = torch.log_softmax(event.logits.float(), -1)  # raw logits: marks (none here) not removed
        assert math.isclose(entry["logprob"], float(logp[event.token_id]), abs_tol=1e-5)
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][-1]["logprob"]
        assert entry["token"] == fb.tokenizer.decode([event.token_id])
    streamed = None
    for chunk in chat.stream("Hello", logprobs=True, top_logprobs=3, max_tokens=6):
        streamed = chunk if streamed is None else streamed + chunk
    again = streamed.response_metadata["logprobs"]["content"]
    # the same tokens and alternatives; the numbers to float rounding (this call starts from the cache the
    # previous one left, which feeds the prompt's last id alone instead of in one forward with the prompt)
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in again] == [
        (e["token"], [t["token"] for t in e["top_logprobs"]]) for e in content
    ]
    for a, b in zip(again, content, strict=True):
        assert math.isclose(a["logprob"], b["logprob"], abs_tol=1e-5)


def test_flare_chain_runs_on_chat_flashback(chat) -> None:
    from langchain_classic.chains.flare.base import FlareChain, QuestionGeneratorChain  # noqa: F401
    from langchain_classic.chains.flare.prompts import PROMPT, QUESTION_GENERATOR_PROMPT
    from langchain_core.documents import Document
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.retrievers import BaseRetriever

    class Docs(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return [Document(page_content="Paris is the capital of France.")]

    short = chat.bind(max_tokens=8)
    flare = FlareChain(
        question_generator_chain=QUESTION_GENERATOR_PROMPT | short | StrOutputParser(),
        response_chain=PROMPT | short.bind(logprobs=True),
        retriever=Docs(),
        max_iter=2,
        min_prob=0.99,  # a random model is unsure of everything: FLARE asks questions and retrieves
    )
    result = flare.invoke({"user_input": "What is the capital of France?"})
    assert isinstance(result["response"], str)


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        (lambda c: c.bind_tools([{"type": "function", "function": {"description": "no name"}}]), "not an OpenAI"),
        (
            lambda c: c.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
            "type object",
        ),
        (lambda c: c.bind_tools([get_weather], tool_choice="nope"), "names no bound tool"),
        (lambda c: c.bind_tools([get_weather], tool_choice=3), "tool_choice must be"),
        (
            lambda c: c.with_structured_output({"type": "object", "properties": {"x": {"type": "frobnicate"}}}),
            "grammar library rejects",
        ),
        (lambda c: c.with_structured_output(Answer, method="xml"), "method must be"),
    ],
)
def test_bad_tools_and_schemas_fail_at_bind_and_change_nothing(chat, bind, message) -> None:
    before = chat.invoke("Hello", max_tokens=6).content
    with pytest.raises(ConfigError, match=message):
        bind(chat)
    assert chat.invoke("Hello", max_tokens=6).content == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "0 to 20"),
        ({"top_logprobs": 2}, "needs logprobs=True"),
        ({"logprobs": "yes"}, "True or False"),
    ],
)
def test_logprobs_out_of_range(chat, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        chat.invoke("Hello", max_tokens=2, **kwargs)
    if kwargs.get("logprobs") != "yes":  # a field: pydantic reads "yes" as True, as for any bool field
        with pytest.raises(ValueError, match=message):
            ChatFlashBack(model=chat.model, mode="none", **kwargs)


def test_unparseable_call_with_auto_is_reported_not_dropped(chat, monkeypatch) -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    text = "Let me check. " + bad
    fb: FlashBackModel = chat.flashback()
    real = fb.stream

    def fake_stream(*args, **kwargs):
        kwargs["max_new_tokens"] = 1
        events = list(real(*args, **kwargs))
        from flashback_integrations.events import FinishEvent, TokenEvent

        result = events[-1].result
        result.text = text
        return iter([TokenEvent(step=0, token_id=0, text=text), FinishEvent(result)])

    monkeypatch.setattr(fb, "stream", fake_stream)
    message = chat.bind_tools([get_weather]).invoke("Weather?")
    assert message.content == "Let me check." and message.tool_calls == []
    (bad,) = message.invalid_tool_calls
    assert "not JSON" in bad["error"] and '"city"' in bad["args"]
    merged = None
    for chunk in chat.bind_tools([get_weather]).stream("Weather?"):
        merged = chunk if merged is None else merged + chunk
    assert merged.tool_calls == [] and len(merged.invalid_tool_calls) == 1


def test_default_tool_choice_first_calls_then_answers(tools_dir) -> None:
    chat = ChatFlashBack(model=tools_dir, mode="none", max_tokens=160, default_tool_choice="first")
    bound = chat.bind_tools([get_weather])
    first = bound.invoke([HumanMessage("Weather in Paris?")])
    assert [c["name"] for c in first.tool_calls] == ["get_weather"]
    result = ToolMessage(get_weather.invoke(first.tool_calls[0]["args"]), tool_call_id=first.tool_calls[0]["id"])
    answer = bound.invoke([HumanMessage("Weather in Paris?"), first, result], max_tokens=8)
    assert answer.response_metadata["finish_reason"] != "tool_calls"
    assert ChatFlashBack(model=tools_dir, mode="none").default_tool_choice == "auto"


def test_text_llm_reports_logprobs_too(tools_dir) -> None:
    from flashback_integrations.langchain import FlashBackLLM as LangChainLLM

    llm = LangChainLLM(model=tools_dir, mode="none", max_tokens=4)
    result = llm.generate(["The json module"], logprobs=True, top_logprobs=1)
    info = result.generations[0][0].generation_info
    assert len(info["logprobs"]["content"]) == info["completion_tokens"]
    assert "logprobs" not in llm.generate(["The json module"]).generations[0][0].generation_info


def test_two_unparseable_streamed_calls_stay_two(chat, monkeypatch) -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    fb: FlashBackModel = chat.flashback()
    real = fb.stream

    def fake_stream(*args, **kwargs):
        from flashback_integrations.events import FinishEvent, TokenEvent

        kwargs["max_new_tokens"] = 1
        result = list(real(*args, **kwargs))[-1].result
        result.text = bad + bad
        return iter(
            [TokenEvent(step=0, token_id=0, text=bad), TokenEvent(step=1, token_id=0, text=bad), FinishEvent(result)]
        )

    monkeypatch.setattr(fb, "stream", fake_stream)
    merged = None
    for chunk in chat.bind_tools([get_weather]).stream("Weather?"):
        merged = chunk if merged is None else merged + chunk
    assert merged.tool_calls == [] and len(merged.invalid_tool_calls) == 2
    assert len(merged.response_metadata["tool_call_errors"]) == 2
