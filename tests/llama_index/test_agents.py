"""FlashBackLLM for LlamaIndex agent builders: base models through complete, async that does not block
the event loop, tool calls (forced by a grammar), structured prediction and logprobs."""

import asyncio
import time
from typing import Literal

import pytest
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field
from tiny import HashRetriever, save_tiny_base, save_tiny_tools_model

from flashback_integrations.errors import ConfigError
from flashback_integrations.llama_index import FlashBackLLM


class Verdict(BaseModel):
    label: Literal["yes", "no"]
    score: int = Field(ge=0, le=9)


def weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    return f"Sunny in {city}"


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory) -> str:
    return save_tiny_tools_model(tmp_path_factory.mktemp("li-tools"))


@pytest.fixture(scope="module")
def llm(tools_dir) -> FlashBackLLM:
    return FlashBackLLM(model=tools_dir, mode="none", max_tokens=120)


def test_base_model_is_not_a_chat_model_and_chats_through_complete(tmp_path) -> None:
    base = FlashBackLLM(model=save_tiny_base(tmp_path / "base", arch="gpt2"), mode="none", max_tokens=6)
    assert base.metadata.is_chat_model is False and base.metadata.is_function_calling_model is False
    reply = base.chat([ChatMessage(role="user", content="The json module")])
    completed = base.complete(base.messages_to_prompt([ChatMessage(role="user", content="The json module")]))
    assert reply.message.content == completed.text
    with pytest.raises(ConfigError, match="no chat template"):
        base.chat_with_tools([FunctionTool.from_defaults(fn=weather)], user_msg="Weather?")


def test_chat_model_flags(llm) -> None:
    assert llm.metadata.is_chat_model and llm.metadata.is_function_calling_model


async def _ticks_during(coro) -> tuple[object, int]:
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    try:
        result = await coro
    finally:
        done = True
        await task
    return result, ticks


async def test_async_calls_do_not_block_the_event_loop(llm) -> None:
    slow = FlashBackLLM(model=llm.model, mode="none", max_tokens=60)
    started = time.perf_counter()
    result, ticks = await _ticks_during(slow.acomplete("The json module", formatted=True))
    elapsed = time.perf_counter() - started
    assert result.text == slow.complete("The json module", formatted=True).text
    assert ticks >= max(2, int(elapsed / 0.005) // 4)  # the loop kept running while the model worked

    async def stream() -> str:
        text = ""
        async for part in await slow.astream_chat([ChatMessage(role="user", content="Hello")]):
            text = part.message.content
        return text

    streamed, ticks = await _ticks_during(stream())
    assert streamed == slow.chat([ChatMessage(role="user", content="Hello")]).message.content and ticks >= 2
    chat = await slow.achat([ChatMessage(role="user", content="Hello")])
    assert chat.message.content == streamed
    parts = [p.delta async for p in await slow.astream_complete("The json module", formatted=True)]
    assert "".join(parts) == result.text


def test_required_tool_call_parses_into_tool_selections(llm) -> None:
    tool = FunctionTool.from_defaults(fn=weather)
    response = llm.chat_with_tools([tool], user_msg="Weather in Paris?", tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "weather" and selection.tool_kwargs["city"] in ("Paris", "Rome")
    assert any(isinstance(b, ToolCallBlock) for b in response.message.blocks)
    output = llm.predict_and_call([tool], user_msg="Weather in Rome?", tool_required=True)
    assert output.response.startswith("Sunny in ")


def test_tool_results_go_back_through_the_template(llm) -> None:
    from flashback_integrations.llama_index.llms import chat_dicts

    history = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(
            role="assistant",
            blocks=[ToolCallBlock(tool_call_id="c1", tool_name="weather", tool_kwargs={"city": "Paris"})],
        ),
        ChatMessage(role="tool", content="Sunny in Paris", additional_kwargs={"tool_call_id": "c1"}),
    ]
    dicts = chat_dicts(history)
    assert dicts[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Paris"}}
    text = llm.flashback().tokenizer.decode(llm.flashback().chat_ids(dicts))
    assert "<tool_response>\nSunny in Paris\n</tool_response>" in text


def test_function_agent_runs_a_tool_and_answers(llm) -> None:
    from llama_index.core.agent.workflow import FunctionAgent

    calls = []

    def lookup(city: Literal["Paris", "Rome"]) -> str:
        """Look up a city."""
        calls.append(city)
        return f"{city} is sunny"

    class FirstCallForced(FlashBackLLM):
        """The random model never calls on its own: force the first turn, answer after the result."""

        def _chat_prompt(self, messages, kwargs):
            kwargs["tool_required"] = not any(m.role == "tool" for m in messages)
            if not kwargs["tool_required"]:
                kwargs.pop("tools", None)
            return super()._chat_prompt(messages, kwargs)

    agent = FunctionAgent(tools=[lookup], llm=FirstCallForced(model=llm.model, mode="none", max_tokens=120))

    async def go():
        return await agent.run("How is Paris?")

    result = asyncio.run(go())
    assert len(calls) == 1 and result.tool_calls and result.tool_calls[0].tool_output.content == f"{calls[0]} is sunny"


def test_structured_predict_and_structured_llm_validate(llm, tools_dir) -> None:
    prompt = PromptTemplate("Is {thing} blue?")
    verdict = llm.structured_predict(Verdict, prompt, thing="the sky")
    assert isinstance(verdict, Verdict)
    structured = llm.as_structured_llm(Verdict)
    response = structured.chat([ChatMessage(role="user", content="Is water wet?")])
    assert isinstance(response.raw, Verdict)
    with_retrieval = FlashBackLLM(
        model=tools_dir, retriever=HashRetriever(), mode="isolated", stride=4, max_doc_tokens=16, max_tokens=120
    )
    assert isinstance(with_retrieval.structured_predict(Verdict, prompt, thing="grass"), Verdict)

    async def go():
        return await llm.astructured_predict(Verdict, prompt, thing="the sea")

    assert isinstance(asyncio.run(go()), Verdict)


def test_logprobs_on_completion_and_chat(llm) -> None:
    response = llm.complete("The json module", formatted=True, logprobs=True, top_logprobs=2, max_tokens=5)
    assert len(response.logprobs) == response.raw["completion_tokens"]
    for position in response.logprobs:
        chosen, *top = position
        assert len(top) == 2 and top[0].logprob >= top[1].logprob and chosen.logprob <= top[0].logprob
    chat = llm.chat([ChatMessage(role="user", content="Hi")], logprobs=True, max_tokens=3)
    assert [len(p) for p in chat.logprobs] == [1] * chat.raw["completion_tokens"]
    with pytest.raises(ConfigError, match="0 to 20"):
        llm.complete("x", logprobs=True, top_logprobs=50)
