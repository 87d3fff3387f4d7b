"""What a user relies on beyond exactness: streaming, stopping, sampling, callbacks, retriever protocol."""

from __future__ import annotations

import threading
import zlib

import pytest
import torch
from tiny import HashRetriever, make_model

from flashback_integrations import (
    BM25Retriever,
    ConfigError,
    FinishEvent,
    FlashBackCallback,
    FlashBackConfig,
    FlashBackModel,
    Passage,
    RetrievalEvent,
    TokenEvent,
)
from flashback_integrations.engine.text import StreamingText

CFG = FlashBackConfig(mode="append", stride=4, query_tokens=8, num_passages=1, max_doc_tokens=12, marks=True)


def run(fb: FlashBackModel, **kwargs):
    kwargs.setdefault("config", CFG)
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("ignore_eos", True)
    return fb.generate("The json module", HashRetriever(), **kwargs)


def test_stream_events_and_generate_agree(llama_fb: FlashBackModel) -> None:
    events = list(llama_fb.stream("The json module", HashRetriever(), config=CFG, max_new_tokens=10, ignore_eos=True))
    assert isinstance(events[-1], FinishEvent)
    result = events[-1].result
    kinds = ["R" if isinstance(e, RetrievalEvent) else "T" for e in events[:-1]]
    assert kinds == list("RTTTTRTTTTRTT")  # a retrieval right before tokens 0, 4 and 8
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.token_id for e in tokens] == result.token_ids
    assert "".join(e.text for e in tokens) == result.text
    assert result.text == llama_fb.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.token_ids == run(llama_fb, max_new_tokens=10).token_ids
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(llama_fb.tokenizer("The json module").input_ids)


def test_prompt_as_ids_equals_prompt_as_text(llama_fb: FlashBackModel) -> None:
    ids = llama_fb.tokenizer("The json module").input_ids
    assert llama_fb.generate(ids, HashRetriever(), config=CFG, max_new_tokens=12, ignore_eos=True).token_ids == (
        run(llama_fb, max_new_tokens=12).token_ids
    )


def test_stop_string_cuts_exactly_even_across_tokens(llama_fb: FlashBackModel) -> None:
    full = run(llama_fb, max_new_tokens=30)
    text = full.text
    assert len(text) > 12
    stop = text[5:9]  # a piece in the middle, usually spanning token boundaries
    cut = run(llama_fb, max_new_tokens=30, stop=["never-there", stop])
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids)
    streamed = "".join(
        e.text
        for e in llama_fb.stream(
            "The json module", HashRetriever(), config=CFG, max_new_tokens=30, ignore_eos=True, stop=stop
        )
        if isinstance(e, TokenEvent)
    )
    assert streamed == cut.text


def test_streaming_text_holds_back_possible_stop_prefix() -> None:
    tok = make_model("gpt2", marks=False)[1]
    ids = tok("abc STOP def").input_ids
    st = StreamingText(tok, ["STOP"])
    pieces = [st.add(i) for i in ids]
    pieces.append(st.finish())
    assert "".join(pieces) == "abc "
    assert st.stopped and st.text == "abc "
    st2 = StreamingText(tok, ["STOPPER"])
    out = "".join(st2.add(i) for i in ids) + st2.finish()
    assert out == "abc STOP def" and not st2.stopped


def test_eos_ends_generation(llama_fb: FlashBackModel) -> None:
    ref = run(llama_fb, max_new_tokens=12).token_ids
    eos = next(t for i, t in enumerate(ref) if i >= 3 and t not in ref[:i])
    position = ref.index(eos)
    original = llama_fb.model.generation_config.eos_token_id
    llama_fb.model.generation_config.eos_token_id = eos
    try:
        out = llama_fb.generate("The json module", HashRetriever(), config=CFG, max_new_tokens=12)
        ignored = run(llama_fb, max_new_tokens=12)
    finally:
        llama_fb.model.generation_config.eos_token_id = original
    assert out.finish_reason == "eos"
    assert out.token_ids == ref[: position + 1]
    assert out.text == llama_fb.tokenizer.decode(ref[:position], skip_special_tokens=True)
    assert ignored.token_ids == ref


def test_marking_tokens_are_never_generated() -> None:
    model, tok = make_model("llama", marks=True, seed=3)
    ml, mr = tok.convert_tokens_to_ids(["<MARK_L>", "<MARK_R>"])

    def favour_marks(module, inputs, output):  # make the marks the model's favourite tokens
        output[..., [ml, mr]] += 100.0
        return output

    model.get_output_embeddings().register_forward_hook(favour_marks)
    fb = FlashBackModel(model, tok)
    for marks in (True, False):
        events = list(
            fb.stream(
                "The json module",
                HashRetriever(),
                config=CFG.replace(marks=marks),
                max_new_tokens=12,
                ignore_eos=True,
                output_logits=True,
            )
        )
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert all(int(torch.argmax(e.logits)) in (ml, mr) for e in tokens)  # raw logits prefer a mark
        assert not {ml, mr} & {e.token_id for e in tokens}


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(llama_fb: FlashBackModel) -> None:
    a = run(llama_fb, temperature=1.5, seed=7)
    b = run(llama_fb, temperature=1.5, seed=7)
    c = run(llama_fb, temperature=1.5, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert run(llama_fb, temperature=1.0, top_p=1e-6, seed=1).token_ids == run(llama_fb).token_ids


class Recorder(FlashBackCallback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_retrieval_start(self, step, query):
        self.calls.append(("start", step, query))

    def on_retrieval_end(self, retrieval):
        self.calls.append(("end", retrieval.step, retrieval))

    def on_retrieval_error(self, step, query, error):
        self.calls.append(("error", step, error))


def test_callbacks_report_every_retrieval(llama_fb: FlashBackModel) -> None:
    rec = Recorder()
    out = run(llama_fb, max_new_tokens=10, callbacks=[rec])
    assert [(c[0], c[1]) for c in rec.calls] == [
        ("start", 0),
        ("end", 0),
        ("start", 4),
        ("end", 4),
        ("start", 8),
        ("end", 8),
    ]
    ends = [c[2] for c in rec.calls if c[0] == "end"]
    assert ends == out.retrievals
    for start, r in zip(rec.calls[::2], ends, strict=True):
        assert start[2] == r.query
        assert r.passages and r.block_tokens > 2 and r.latency_s >= 0 and r.error is None


def test_plain_callable_retriever_returning_strings(llama_fb: FlashBackModel) -> None:
    seen = []

    def fn(query: str, k: int) -> list[str]:
        seen.append((query, k))
        return ["The json module encodes Python objects as JSON text.", "extra", "more"]

    out = llama_fb.generate("The json module", fn, config=CFG.replace(num_passages=2), max_new_tokens=5)
    assert seen and all(k == 2 for _, k in seen)
    assert [p.text for p in out.retrievals[0].passages] == [
        "The json module encodes Python objects as JSON text.",
        "extra",
    ]  # cut to k


def test_threads_give_the_same_outputs_as_sequential_calls(llama_fb: FlashBackModel) -> None:
    prompts = ["The json module", "Regular expressions", "cache token", "HTTP servers answer"]
    expected = [
        llama_fb.generate(p, HashRetriever(), config=CFG, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts
    ]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        results[i] = llama_fb.generate(
            prompts[i], HashRetriever(), config=CFG, max_new_tokens=16, ignore_eos=True
        ).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected


def test_bm25_retriever_ranks_and_filters(tmp_path) -> None:
    texts = ["the json module encodes data", "http server in python", "regular expressions with re"]
    r = BM25Retriever(texts)
    top = r.retrieve("how to encode json", 2)
    assert top[0].text == texts[0] and isinstance(top[0], Passage) and top[0].score > 0
    assert r.retrieve("the of and", 3) == []  # stop words only: no block rather than noise
    assert len(r.retrieve("python json re", 10)) <= 3
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(250)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("json json json")
    files = BM25Retriever.from_files([tmp_path], chunk_words=100)
    assert len(files.texts) == 4
    assert files.retrieve("json", 1)[0].id.endswith("b.txt#0")


def test_pretokenised_passages_skip_tokenisation(llama_fb: FlashBackModel) -> None:
    tok = llama_fb.tokenizer
    text = "The json module encodes Python objects as JSON text."
    ids = tuple(tok(text, add_special_tokens=False).input_ids)
    as_text = llama_fb.generate("json", lambda q, k: [text], config=CFG, max_new_tokens=6, ignore_eos=True)
    as_ids = llama_fb.generate(
        "json", lambda q, k: [Passage(text="", token_ids=ids)], config=CFG, max_new_tokens=6, ignore_eos=True
    )
    assert as_ids.token_ids == as_text.token_ids
    assert as_ids.retrievals[0].block_tokens == min(len(ids), CFG.max_doc_tokens) + 2


class FixedLengthRetriever:
    """Query-dependent passages of exactly ``n`` tokens, so batched rows keep equal lengths."""

    def __init__(self, n: int = 6, vocab: int = 250) -> None:
        self.n, self.vocab = n, vocab

    def retrieve(self, query: str, k: int):
        h = zlib.crc32(query.encode())
        return [Passage(text="", token_ids=tuple(10 + (h * (i + 3) + 7 * j) % self.vocab for j in range(self.n)))
                for i in range(k)]  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("mode", ["append", "prepend", "none"])
def test_batched_rows_equal_each_row_generated_alone(arch: str, mode: str) -> None:
    model, tok = make_model(arch, marks=True)
    fb = FlashBackModel(model, tok)
    torch.manual_seed(1)
    prompts = [torch.randint(10, 250, (9,)).tolist() for _ in range(4)]
    cfg = FlashBackConfig(mode=mode, stride=3, query_tokens=5, max_doc_tokens=6)
    retriever = FixedLengthRetriever()
    batch = fb.generate_batch(prompts, retriever if mode != "none" else None, config=cfg, max_new_tokens=10)
    for prompt, got in zip(prompts, batch, strict=True):
        alone = fb.generate(
            prompt, retriever if mode != "none" else None, config=cfg, max_new_tokens=10, ignore_eos=True
        )
        assert got.token_ids == alone.token_ids
        assert [r.query for r in got.retrievals] == [r.query for r in alone.retrievals]
    if mode == "append":  # the batch reuses the cache like a single row does
        assert [r.reused_tokens for r in batch[0].retrievals][1:] == [r.reused_tokens for r in alone.retrievals][1:]


def test_batched_rows_must_keep_equal_lengths() -> None:
    model, tok = make_model("llama", marks=True)
    fb = FlashBackModel(model, tok)
    with pytest.raises(ConfigError, match="equal token length"):
        fb.generate_batch([[11, 12, 13], [11, 12]], config=FlashBackConfig(mode="none"), max_new_tokens=2)
    with pytest.raises(ConfigError, match="diverged"):
        fb.generate_batch(
            [[11, 12, 13], [40, 41, 42]], HashRetriever(), config=FlashBackConfig(stride=2), max_new_tokens=4
        )
    assert fb.generate([11, 12, 13], max_new_tokens=3, config=FlashBackConfig(mode="none")).token_ids  # still usable
