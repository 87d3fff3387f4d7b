"""The llama.cpp backend: the same loop on a GGUF, with the torch backend's tokens and cache arithmetic.

Needs ``llama-cpp-python`` (the optional ``llamacpp`` extra, compiled on install); skipped without it.
"""

from __future__ import annotations

import builtins

import pytest
import torch
from tiny import HashRetriever, save_tiny_base, save_tiny_export

from flashback_integrations import ConfigError, FlashBackConfig, FlashBackModel, TokenEvent
from flashback_integrations.loading.export import export_gguf, export_hf

TRAINED = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_tiny_export(tmp_path_factory, TRAINED)


@pytest.fixture(scope="module")
def both(exported):
    pytest.importorskip("llama_cpp")
    return FlashBackModel.from_pretrained(str(exported)), FlashBackModel.from_gguf(str(exported), n_threads=1)


def _run(fb: FlashBackModel, mode: str, prompt: str = "The json module dumps") -> tuple[list, list, object]:
    events = list(
        fb.stream(
            prompt, HashRetriever(), config=TRAINED.replace(mode=mode), max_new_tokens=14, ignore_eos=True,
            output_logits=True,
        )
    )  # fmt: skip
    logits = [e.logits for e in events if isinstance(e, TokenEvent)]
    return logits, [e for e in events if isinstance(e, TokenEvent)], events[-1].result


@pytest.mark.parametrize("mode", ["none", "append", "prepend"])
def test_llamacpp_gives_the_torch_backends_tokens_logits_and_cache_costs(both, mode) -> None:
    reference, cpp = both
    want_logits, _, want = _run(reference, mode)
    got_logits, _, got = _run(cpp, mode)
    assert got.token_ids == want.token_ids
    for a, b in zip(got_logits, want_logits, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2)  # fp32 weights; llama.cpp keeps its KV cache in fp16
    # after the first retrieval, the same crop and re-feed; the first may reuse an earlier call's prompt
    assert [r.prefill_tokens for r in got.retrievals[1:]] == [r.prefill_tokens for r in want.retrievals[1:]]
    assert [r.reused_tokens for r in got.retrievals[1:]] == [r.reused_tokens for r in want.retrievals[1:]]
    if got.retrievals:
        assert got.retrievals[0].prefill_tokens <= want.retrievals[0].prefill_tokens


def test_a_second_call_reuses_the_first_calls_cache(both) -> None:
    _, cpp = both
    first = cpp.generate("The json module dumps", max_new_tokens=6, config=TRAINED.replace(mode="none"))
    again = cpp.generate("The json module dumps", max_new_tokens=6, config=TRAINED.replace(mode="none"))
    assert again.token_ids == first.token_ids
    assert again.forward_tokens < first.forward_tokens  # the prompt came from llama.cpp's cache
    assert again.forward_tokens == len(again.token_ids)  # only the last prompt id and each new token


def test_what_llamacpp_cannot_do_is_refused_before_any_work(both, exported, tmp_path) -> None:
    _, cpp = both
    with pytest.raises(ConfigError, match="passage_sink"):
        cpp.generate("x", HashRetriever(), config=FlashBackConfig(mode="isolated", passage_sink=True))
    with pytest.raises(ConfigError, match="torch backend"):
        cpp.generate_batch(["x", "y"], max_new_tokens=2)
    save_tiny_base(tmp_path / "base", seed=3)
    bare = export_hf(str(tmp_path / "base"), "none", tmp_path / "bare")  # no adapter: no marks in this GGUF...
    export_gguf(bare, bare / "model.gguf", dtype="float32")
    with pytest.raises(ConfigError, match="not the same model"):  # ...so the marked tokenizer does not fit it
        FlashBackModel.from_gguf(str(exported), gguf=bare / "model.gguf")


def test_without_llama_cpp_the_error_says_how_to_install(exported, monkeypatch) -> None:
    real = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("no llama_cpp")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(ConfigError, match=r"\[llamacpp\]"):
        FlashBackModel.from_gguf(str(exported))


def test_framework_classes_and_cli_take_the_backend(both, exported) -> None:
    from typer.testing import CliRunner

    from flashback_integrations.cli import app
    from flashback_integrations.langchain import FlashBackLLM

    settings = {"model": str(exported), "retriever": HashRetriever(), "max_tokens": 10, "stride": 4, "query_tokens": 8}
    settings.update(num_passages=1, max_doc_tokens=12)
    on_cpp = FlashBackLLM(**settings, backend="llamacpp")
    assert on_cpp.flashback().backend.name == "llamacpp" and on_cpp.flashback().config.mode == "append"  # the export's
    assert on_cpp.invoke("The json module dumps") == FlashBackLLM(**settings).invoke("The json module dumps")
    result = CliRunner().invoke(
        app, ["generate", "The json module", "--model", str(exported), "--backend", "llamacpp", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "retrieval @ token 0" in result.output


# ----------------------------------------------------------------------------- the isolated layout
@pytest.fixture(scope="module")
def exact(exported):
    """The same export on torch and on llama.cpp with an fp32 KV cache (logits to float rounding)."""
    pytest.importorskip("llama_cpp")
    return FlashBackModel.from_pretrained(str(exported)), FlashBackModel.from_gguf(
        str(exported), n_threads=1, kv_type="f32", passage_room=64
    )


def _isolated(fb, config, prompt="The json module dumps", retriever=None, tokens=14):
    events = list(
        fb.stream(prompt, retriever or HashRetriever(), config=config, max_new_tokens=tokens, ignore_eos=True,
                  output_logits=True)
    )  # fmt: skip
    return [e.logits for e in events if isinstance(e, TokenEvent)], events[-1].result


@pytest.mark.parametrize("tail", [1, 4])
@pytest.mark.parametrize("stride", [1, 4])
@pytest.mark.parametrize("passages", [1, 3])
@pytest.mark.parametrize("marks", [True, False])
def test_isolated_on_llamacpp_is_the_torch_layout(exact, tail, stride, passages, marks) -> None:
    """Passages at their own positions before the text, read by the last ``tail`` tokens only: the same
    tokens and logits as the torch backend's exact layout, and the same text-side cache arithmetic."""
    reference, cpp = exact
    cfg = TRAINED.replace(mode="isolated", tail_tokens=tail, stride=stride, num_passages=passages, marks=marks)
    reference.passage_cache.clear()
    cpp.passage_cache.clear()
    want_logits, want = _isolated(reference, cfg)
    got_logits, got = _isolated(cpp, cfg)
    assert got.token_ids == want.token_ids
    assert len(got.retrievals) == len(want.retrievals) > 1
    for a, b in zip(got_logits, want_logits, strict=True):  # llama.cpp's kernels differ by ~2e-3 even in mode none
        assert torch.allclose(a.float(), b.float(), atol=1e-2), (a - b).abs().max()
    for g, w in zip(got.retrievals, want.retrievals, strict=True):
        assert (g.block_tokens, g.segments_computed, g.segments_reused) == (
            w.block_tokens, w.segments_computed, w.segments_reused
        )  # fmt: skip


def test_the_tolerance_tells_layouts_apart(exact) -> None:
    """The control: another layout (the same passages read by the whole history) is far outside the
    tolerance above, so passing it means the llama.cpp backend built the isolated layout."""
    reference, _ = exact
    cfg = TRAINED.replace(mode="isolated", tail_tokens=1)
    isolated, _ = _isolated(reference, cfg)
    wide, _ = _isolated(reference, cfg.replace(tail_tokens=64))
    assert max(float((a - b).abs().max()) for a, b in zip(isolated[4:], wide[4:], strict=True)) > 0.1


def test_isolated_passages_are_reused_across_calls_and_the_result_is_unchanged(exact) -> None:
    _, cpp = exact
    cfg = TRAINED.replace(mode="isolated", tail_tokens=2, num_passages=2)
    cpp.passage_cache.clear()
    cold_logits, cold = _isolated(cpp, cfg)
    warm_logits, warm = _isolated(cpp, cfg)
    assert warm.token_ids == cold.token_ids
    assert sum(r.segments_computed for r in warm.retrievals) == 0
    assert sum(r.segments_reused for r in warm.retrievals) == sum(
        r.segments_computed + r.segments_reused for r in cold.retrievals
    )
    for a, b in zip(warm_logits, cold_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert cpp.passage_cache.bytes > 0


def test_isolated_calls_from_several_threads_equal_sequential_calls(exact) -> None:
    from concurrent.futures import ThreadPoolExecutor

    _, cpp = exact
    cfg = TRAINED.replace(mode="isolated", tail_tokens=2, num_passages=2)
    prompts = ["The json module dumps", "Lists are mutable", "A dict maps keys", "The os module"]
    prompts += ["Sets hold unique items", "Tuples are immutable", "The re module", "Strings split"]
    alone = [
        cpp.generate(p, HashRetriever(), config=cfg, max_new_tokens=10, ignore_eos=True).token_ids for p in prompts
    ]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda p: cpp.generate(p, HashRetriever(), config=cfg, max_new_tokens=10, ignore_eos=True).token_ids,
                prompts,
            )
        )
    assert together == alone


def test_a_failed_isolated_call_leaves_the_next_exact(exact) -> None:
    from flashback_integrations.errors import RetrievalError

    reference, cpp = exact
    cfg = TRAINED.replace(mode="isolated", tail_tokens=2)
    calls = []

    def fails_second(query, k):
        calls.append(query)
        if len(calls) == 2:
            raise OSError("index went away")
        return HashRetriever().retrieve(query, k)

    with pytest.raises(RetrievalError):
        cpp.generate("The json module dumps", fails_second, config=cfg, max_new_tokens=14, ignore_eos=True)
    got = cpp.generate("The json module dumps", HashRetriever(), config=cfg, max_new_tokens=14, ignore_eos=True)
    want = reference.generate("The json module dumps", HashRetriever(), config=cfg, max_new_tokens=14, ignore_eos=True)
    assert got.token_ids == want.token_ids


def test_a_block_larger_than_the_passage_room_is_refused_by_name(exact) -> None:
    _, cpp = exact
    cfg = TRAINED.replace(mode="isolated", num_passages=8, max_doc_tokens=12)  # 8 x 14 > room 64
    with pytest.raises(ConfigError, match="passage_room"):
        cpp.generate("The json module dumps", HashRetriever(), config=cfg, max_new_tokens=4, ignore_eos=True)
    assert cpp.generate("x", config=TRAINED.replace(mode="none"), max_new_tokens=2).token_ids  # still usable


def test_models_without_plain_rotary_positions_are_refused_for_isolated() -> None:
    from types import SimpleNamespace

    from flashback_integrations.engine.llamacpp import _position_problem

    lib = SimpleNamespace(
        LLAMA_ROPE_TYPE_NONE=-1, LLAMA_ROPE_TYPE_MROPE=8, llama_model_rope_type=lambda m: m["rope"],
        llama_model_is_recurrent=lambda m: m["recurrent"], llama_model_n_swa=lambda m: m["swa"],
    )  # fmt: skip
    plain = {"rope": 0, "recurrent": False, "swa": 0}
    assert _position_problem(lib, plain) is None
    assert "no rotary" in _position_problem(lib, {**plain, "rope": -1})
    assert "multi-dimensional" in _position_problem(lib, {**plain, "rope": 8})
    assert "recurrent" in _position_problem(lib, {**plain, "recurrent": True})
    assert "sliding-window" in _position_problem(lib, {**plain, "swa": 4096})


# ----------------------------------------------------------------------------- an activated adapter
@pytest.fixture(scope="module")
def activated(tmp_path_factory):
    """A tiny base with an activated isolated adapter, on torch (gated LoRA) and on llama.cpp (a LoRA GGUF
    switched on for the passages and the tail)."""
    pytest.importorskip("llama_cpp")
    from tiny import save_tiny_adapter

    from flashback_integrations.loading.export import export_activated_gguf

    cfg = FlashBackConfig(mode="isolated", stride=4, query_tokens=8, num_passages=2, max_doc_tokens=12, tail_tokens=3)
    base = tmp_path_factory.mktemp("act-base")
    save_tiny_base(base, seed=5)
    adapter = tmp_path_factory.mktemp("act-adapter")
    save_tiny_adapter(base, adapter, cfg, seed=2, activated=True)
    out = export_activated_gguf(str(base), adapter, tmp_path_factory.mktemp("act-export") / "out", dtype="float32")
    torch_fb = FlashBackModel.from_pretrained(str(base), adapter=str(adapter))
    cpp = FlashBackModel.from_gguf(str(out), n_threads=1, kv_type="f32", passage_room=64)
    return torch_fb, cpp, out, base, adapter


@pytest.mark.parametrize("mode", ["isolated", "none"])
def test_an_activated_adapter_on_llamacpp_is_the_torch_gate(activated, mode) -> None:
    """The LoRA is on for the passage segments and the tail only: the same tokens and logits as the torch
    backend's per-token gate; without retrieval, the base model's."""
    reference, cpp, *_ = activated
    assert reference.backend.activated and cpp.backend.activated
    cfg = reference.config.replace(mode=mode)
    want_logits, want = _isolated(reference, cfg)
    got_logits, got = _isolated(cpp, cfg)
    assert cpp.config.mode == "isolated" and cpp.config.tail_tokens == 3  # the adapter's layout came along
    assert got.token_ids == want.token_ids
    words = _without_marks(reference)  # the marks' head rows: random on torch, zeros in an export; never generated
    for a, b in zip(got_logits, want_logits, strict=True):
        assert torch.allclose(a[words].float(), b[words].float(), atol=1e-2), (a - b)[words].abs().max()


def _without_marks(fb) -> torch.Tensor:
    words = torch.ones(fb.backend.vocab_size, dtype=torch.bool)
    words[[fb.mark_ids.left, fb.mark_ids.right]] = False
    return words


def test_the_lora_gguf_matters(activated) -> None:
    """The control: without its LoRA GGUF the same export gives other logits after the first retrieval."""
    reference, _, out, *_ = activated
    plain = FlashBackModel.from_gguf(str(out), gguf=out / "model.gguf", n_threads=1, kv_type="f32", passage_room=64)
    plain.backend._set_lora(False)
    plain.backend._adapter = None  # as if the export had no adapter.gguf
    cfg = reference.config
    want_logits, _ = _isolated(reference, cfg)
    got_logits, _ = _isolated(plain, cfg)
    words = _without_marks(reference)
    assert max(float((a - b)[words].abs().max()) for a, b in zip(got_logits, want_logits, strict=True)) > 0.05


def test_an_activated_export_refuses_merged_modes(activated) -> None:
    _, cpp, *_ = activated
    with pytest.raises(ConfigError, match="activated"):
        cpp.generate("x", HashRetriever(), config=cpp.config.replace(mode="append"), max_new_tokens=2)
