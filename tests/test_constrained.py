"""Grammar-constrained decoding, tool-call parsing and logprobs in the engine, on tiny random models:
the output matches the grammar in every mode, a grammar that allows everything changes nothing, and
bad grammars fail before any model work."""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from tiny import HashRetriever, make_model

from flashback_integrations import FlashBackConfig, FlashBackModel, TokenEvent
from flashback_integrations.engine.constrained import Constraint, Grammar, closed
from flashback_integrations.errors import ConfigError
from flashback_integrations.tools import CallStream, ToolCall, call_grammar, parse_tool_calls


class Item(BaseModel):
    kind: Literal["book", "film", "song"]
    year: int = Field(ge=1900, le=2030)
    liked: bool


PROMPT = "The json module"
MODES = [
    FlashBackConfig(mode="none"),
    FlashBackConfig(mode="append", stride=4, max_doc_tokens=12),
    FlashBackConfig(mode="prepend", stride=4, max_doc_tokens=12),
    FlashBackConfig(mode="isolated", stride=4, max_doc_tokens=12, tail_tokens=2),
]


@pytest.fixture(scope="module")
def fb() -> FlashBackModel:
    model, tok = make_model("llama", marks=True, positions=2048)
    return FlashBackModel(model, tok, config=FlashBackConfig(mode="none"))


@pytest.mark.parametrize("config", MODES, ids=lambda c: c.mode)
def test_json_schema_output_validates_in_every_mode(fb, config) -> None:
    grammar = Grammar.json_schema(closed(Item.model_json_schema()))
    retriever = HashRetriever() if config.retrieves else None
    result = fb.generate(PROMPT, retriever, config=config, max_new_tokens=120, grammar=grammar)
    assert result.finish_reason == "eos"
    Item.model_validate_json(result.text)
    if config.retrieves:
        assert len(result.retrievals) >= 2  # retrieval kept going while the grammar wrote


def test_regex_and_lark(fb) -> None:
    out = fb.generate(PROMPT, max_new_tokens=40, grammar=Grammar.regex(r"[0-9]{3}-[a-c]{2}")).text
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", out)
    lark = 'start: "answer: " ("yes" | "no")'
    assert fb.generate(PROMPT, max_new_tokens=40, grammar=Grammar.lark(lark)).text in ("answer: yes", "answer: no")


def test_json_object_mode(fb) -> None:
    result = fb.generate(PROMPT, max_new_tokens=300, grammar=Grammar.json_object())
    assert result.text.startswith("{")
    if result.finish_reason == "eos":
        assert isinstance(json.loads(result.text), dict)


def test_each_token_is_the_best_one_the_grammar_allows(fb) -> None:
    """Replayed step by step: the engine's choice is the argmax of the raw logits with the marks and
    the grammar's forbidden tokens removed, nothing else."""
    grammar = Grammar.json_schema(closed(Item.model_json_schema()))
    events = list(fb.stream(PROMPT, max_new_tokens=60, grammar=grammar, output_logits=True))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    replay = Constraint(grammar, fb.tokenizer, fb.model.get_input_embeddings().weight.shape[0], fb.eos_ids)
    changed = 0
    for event in tokens:
        logits = event.logits.clone()
        logits[[fb.mark_ids.left, fb.mark_ids.right]] = float("-inf")
        masked = replay.mask(logits)
        assert event.token_id == int(torch.argmax(masked))
        changed += int(torch.argmax(logits)) != event.token_id
        replay.accept(event.token_id)
    assert changed > 0  # the grammar did steer this random model


def test_forced_tool_call(fb) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "pick",
                "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}},
            },
        }
    ]
    result = fb.generate(PROMPT, max_new_tokens=80, grammar=call_grammar(tools))
    parsed = parse_tool_calls(result.text)
    assert parsed.invalid == [] and [c.name for c in parsed.calls] == ["pick"]
    assert set(parsed.calls[0].arguments) <= {"n"}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Grammar.json_schema({"type": "object", "properties": {"x": {"type": "frobnicate"}}}), "frobnicate"),
        (lambda: Grammar.json_schema("{not json"), "not JSON"),
        (lambda: Grammar.json_schema(42), "must be a dict"),
        (lambda: Grammar.regex("a(("), "unclosed group"),
        (lambda: Grammar.lark("start: nothing_defined"), "unknown name"),
        (lambda: Grammar.lark(""), "non-empty"),
    ],
)
def test_bad_grammars_fail_when_built(build, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_bad_grammar_use_fails_before_model_work_and_changes_nothing(fb) -> None:
    before = fb.generate(PROMPT, max_new_tokens=8).token_ids
    with pytest.raises(ConfigError, match="must be a Grammar"):
        fb.generate(PROMPT, max_new_tokens=8, grammar={"type": "object"})
    with pytest.raises(ConfigError, match="ignore_eos"):
        fb.generate(PROMPT, max_new_tokens=8, grammar=Grammar.json_object(), ignore_eos=True)
    assert fb.generate(PROMPT, max_new_tokens=8).token_ids == before


def test_logprobs_are_the_models_distribution_without_the_marks(fb) -> None:
    events = list(fb.stream(PROMPT, max_new_tokens=6, output_logits=True, logprobs=True, top_logprobs=4))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    result = events[-1].result
    assert [e.token_id for e in result.logprobs] == result.token_ids
    marks = [fb.mark_ids.left, fb.mark_ids.right]
    for event, entry in zip(tokens, result.logprobs, strict=True):
        logits = event.logits.clone()
        logits[marks] = float("-inf")
        logp = torch.log_softmax(logits.float(), -1)
        assert entry.logprob == pytest.approx(float(logp[event.token_id]), abs=1e-5)
        best = torch.topk(logp, 4)
        assert [i for i, _ in entry.top] == best.indices.tolist()
        assert not set(marks) & {i for i, _ in entry.top}
    assert fb.generate(PROMPT, max_new_tokens=6).logprobs is None  # off unless asked for


def test_closed_closes_every_object_that_lists_properties() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}, "c": {"const": {"x": 1}}},
        "$defs": {"D": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["$defs"]["D"]["additionalProperties"] is True  # an explicit choice is kept
    assert out["properties"]["c"] == {"const": {"x": 1}}  # values are data, not schemas


CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    before=st.text(alphabet="ab <>/_tolc", max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_streamed_parsing_equals_whole_parsing_for_any_split(before, cuts) -> None:
    text = before + CALL + " after " + CALL.replace('"x": 1', '"x": 2') + " <tool_call>{broken"
    whole = parse_tool_calls(text)
    stream = CallStream()
    pieces = []
    last = 0
    for cut in sorted({min(c, len(text)) for c in cuts}) + [len(text)]:
        pieces.extend(stream.feed(text[last:cut]))
        last = cut
    pieces.extend(stream.close())
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.calls]
    assert len([p for p in pieces if not isinstance(p, (str, ToolCall))]) == len(whole.invalid) == 1
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == whole.content
