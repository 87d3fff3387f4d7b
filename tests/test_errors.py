"""Bad input gets a clear error before any work, and the same model generates correctly afterwards."""

from __future__ import annotations

import time

import pytest
from tiny import HashRetriever, make_model

from flashback_integrations import (
    ConfigError,
    ContextWindowError,
    FlashBackConfig,
    FlashBackModel,
    MarksUnavailableError,
    RetrievalError,
)

CFG = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)


def reference(fb: FlashBackModel) -> list[int]:
    return fb.generate("The json module", HashRetriever(), config=CFG, max_new_tokens=12, ignore_eos=True).token_ids


@pytest.fixture
def fb_and_ref(llama_fb: FlashBackModel):
    ref = reference(llama_fb)
    yield llama_fb, ref
    assert reference(llama_fb) == ref, "the model must generate exactly as before after a failed call"


class Boom:
    def __init__(self, fail_at: set[int] | None = None, exc: Exception | None = None) -> None:
        self.n = 0
        self.fail_at = fail_at
        self.exc = exc or ConnectionError("vector store down")
        self.inner = HashRetriever()

    def retrieve(self, query: str, k: int):
        i, self.n = self.n, self.n + 1
        if self.fail_at is None or i in self.fail_at:
            raise self.exc
        return self.inner.retrieve(query, k)


def test_failing_retriever_raises_with_policy_hint(fb_and_ref) -> None:
    fb, _ = fb_and_ref
    with pytest.raises(RetrievalError, match="vector store down.*on_retrieval_error='skip'"):
        fb.generate("The json module", Boom({1}), config=CFG, max_new_tokens=12)


def test_skip_policy_generates_the_stride_without_a_block(fb_and_ref) -> None:
    fb, _ = fb_and_ref
    cfg = CFG.replace(on_retrieval_error="skip")
    out = fb.generate("The json module", Boom(), config=cfg, max_new_tokens=12, ignore_eos=True)
    assert [r.error for r in out.retrievals] == ["ConnectionError: vector store down"] * 3
    assert all(r.block_tokens == 0 and r.passages == [] for r in out.retrievals)
    plain = fb.generate("The json module", config=CFG.replace(mode="none"), max_new_tokens=12, ignore_eos=True)
    assert out.token_ids == plain.token_ids  # no block at all means the plain context
    partial = fb.generate("The json module", Boom({1}), config=cfg, max_new_tokens=12, ignore_eos=True)
    assert [r.error is None for r in partial.retrievals] == [True, False, True]


def test_retriever_timeout(fb_and_ref) -> None:
    fb, _ = fb_and_ref

    def slow(query: str, k: int) -> list[str]:
        time.sleep(3)
        return ["late"]

    cfg = CFG.replace(on_retrieval_error="skip", retrieval_timeout=0.05)
    out = fb.generate("The json module", slow, config=cfg, max_new_tokens=5, ignore_eos=True)
    assert "retrieval_timeout=0.05" in out.retrievals[0].error
    with pytest.raises(RetrievalError, match="TimeoutError"):
        fb.generate("The json module", slow, config=cfg.replace(on_retrieval_error="raise"), max_new_tokens=5)


@pytest.mark.parametrize("bad", [42, "a plain string", [{"text": "dict"}], [b"bytes"], [None]])
def test_retriever_returning_non_text_is_refused_even_with_skip(fb_and_ref, bad) -> None:
    fb, _ = fb_and_ref
    for policy in ("raise", "skip"):
        with pytest.raises(RetrievalError, match="must return a list of str or Passage"):
            fb.generate(
                "The json module",
                lambda q, k: bad,
                config=CFG.replace(on_retrieval_error=policy),
                max_new_tokens=5,
            )


def test_marks_requested_but_missing() -> None:
    model, tok = make_model("llama", marks=False)
    fb = FlashBackModel(model, tok, name="no-marks")
    with pytest.raises(MarksUnavailableError, match="no <MARK_L>/<MARK_R>.*adapter"):
        fb.generate("The json module", HashRetriever(), config=CFG, max_new_tokens=4)
    out = fb.generate(
        "The json module", HashRetriever(), config=CFG.replace(marks=None), max_new_tokens=8, ignore_eos=True
    )  # auto: runs without marks
    assert out.retrievals[0].block_tokens == out.retrievals[0].prefill_tokens - out.prompt_tokens


def test_context_window_checked_before_any_work(fb_and_ref) -> None:
    fb, _ = fb_and_ref
    retriever = HashRetriever()
    with pytest.raises(ContextWindowError) as info:
        fb.generate(
            "The json module", retriever, config=CFG.replace(max_doc_tokens=300, num_passages=2), max_new_tokens=20
        )
    message = str(info.value)
    for number in ("20", "602", "512", "num_passages=2", "max_doc_tokens=300"):
        assert number in message
    assert retriever.calls == []
    with pytest.raises(ContextWindowError):
        fb.generate("word " * 600, config=CFG.replace(mode="none"), max_new_tokens=1)


@pytest.mark.parametrize("field", ["stride", "query_tokens", "num_passages", "max_doc_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_config_rejects_non_positive_sizes(field, value) -> None:
    with pytest.raises(ConfigError, match=field):
        FlashBackConfig(**{field: value})


def test_config_rejects_unknown_mode_and_policy() -> None:
    with pytest.raises(ConfigError, match="mode"):
        FlashBackConfig(mode="middle")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_retrieval_error"):
        FlashBackConfig(on_retrieval_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Unknown"):
        CFG.replace(strid=3)
    assert FlashBackConfig.from_dict(CFG.to_dict()) == CFG


def test_sampling_and_call_arguments(fb_and_ref) -> None:
    fb, _ = fb_and_ref
    with pytest.raises(ConfigError, match="temperature"):
        fb.generate("x", HashRetriever(), config=CFG, temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        fb.generate("x", HashRetriever(), config=CFG, top_p=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        fb.generate("x", HashRetriever(), config=CFG, max_new_tokens=0)
    with pytest.raises(ConfigError, match="needs a retriever"):
        fb.generate("x", config=CFG)
    with pytest.raises(ConfigError, match="neither"):
        fb.generate("x", 123, config=CFG)  # type: ignore[arg-type]


def test_empty_prompt() -> None:
    model, tok = make_model("gpt2", marks=True, with_bos=False)
    fb = FlashBackModel(model, tok)
    with pytest.raises(ConfigError, match="empty.*no BOS"):
        fb.generate("", HashRetriever(), config=CFG, max_new_tokens=3)
    assert len(fb.generate("json", HashRetriever(), config=CFG, max_new_tokens=3, ignore_eos=True).token_ids) == 3
    model, tok = make_model("llama", marks=True)
    out = FlashBackModel(model, tok).generate("", HashRetriever(), config=CFG, max_new_tokens=6, ignore_eos=True)
    assert out.prompt_tokens == 1 and len(out.token_ids) == 6


def test_dtype_and_device_names_are_checked_before_loading(tmp_path) -> None:
    import torch
    from typer.testing import CliRunner

    from flashback_integrations.cli import app
    from flashback_integrations.loading.devices import resolve_device, resolve_dtype

    assert resolve_dtype("torch.bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="not one of float32, bfloat16, float16"):
        resolve_dtype("float99")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU; use --device cpu"):
            resolve_device("cuda")
    missing = tmp_path / "no-model-here"  # would fail to resolve if loading had started
    with pytest.raises(ConfigError, match="dtype 'float99'"):
        FlashBackModel.from_pretrained(str(missing), dtype="float99")
    runner = CliRunner()
    for args, message in (
        (["bench", "speed", "--modes", "append,sideways"], "unknown mode(s) ['sideways']"),
        (["bench", "speed", "--model", "config:llama-3b"], "unknown config 'config:llama-3b'"),
        (["bench", "forward", "--lengths", "512,abc"], "comma-separated whole numbers"),
        (["bench", "forward", "--dtype", "fp8"], "dtype 'fp8' is not one of"),
        (["bench", "speed", "--repeats", "0"], "--repeats must be at least 1"),
        (["bench", "speed", "--tail-tokens", "0"], "--tail-tokens must be at least 1, got 0"),
    ):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()
