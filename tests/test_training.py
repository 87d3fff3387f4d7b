"""Example building, the trainer and the perplexity evaluation, on tiny in-process models and real text."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import make_model, save_tiny_base
from typer.testing import CliRunner

from flashback_integrations import AdapterMismatchError, ConfigError, FlashBackModel, RetrievalError
from flashback_integrations.cli import app
from flashback_integrations.data import sample_corpus_dir
from flashback_integrations.engine.layout import MarkIds, find_mark_ids
from flashback_integrations.retrieval.base import Passage
from flashback_integrations.training.examples import (
    ExampleSettings,
    ExcludingRetriever,
    build_examples,
    chunk_retriever,
    example_ids,
    load_documents,
    load_examples,
    prepare_examples,
    save_examples,
    split_documents,
)
from flashback_integrations.training.perplexity import PplRow, bootstrap, paper_rows, run_eval
from flashback_integrations.training.scoring import (
    Teacher,
    collate,
    pad_id_of,
    target_logprobs,
    target_nll,
    training_loss,
)
from flashback_integrations.training.setup import load_for_training
from flashback_integrations.training.trainer import TrainConfig, train

SETTINGS = ExampleSettings(
    context_budget=128,
    target_tokens=8,
    target_every=8,
    first_target=64,
    query_tokens=24,
    max_doc_tokens=24,
    min_window=48,
)


@pytest.fixture(scope="module")
def tok():
    return make_model("llama", marks=False)[1]


@pytest.fixture(scope="module")
def docs(tok):
    return load_documents([sample_corpus_dir()], tok)


@pytest.fixture(scope="module")
def examples(tok, docs):
    return build_examples(docs, tok, chunk_retriever(docs, tok, 32), SETTINGS, seed=0, progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    save_tiny_base(path)
    return path


def _load_base(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


FAST = dict(steps=6, batch_size=4, micro_batch_size=2, eval_every=3, save_every=2, lr=5e-3, device="cpu")


# --------------------------------------------------------------------------- examples
def test_examples_are_target_windows_of_their_document(examples, docs, tok) -> None:
    by_source = {d.source: d for d in docs}
    assert len(examples) > 20 and len({e.source for e in examples}) == len(docs)
    for e in examples:
        ids = by_source[e.source].ids
        t = e.target_start
        assert t >= SETTINGS.first_target and (t - SETTINGS.first_target) % SETTINGS.target_every == 0
        assert e.tgt == ids[t : t + SETTINGS.target_tokens]
        assert e.src == ids[t - len(e.src) : t]
        assert e.query == tok.decode(ids[t - SETTINGS.query_tokens : t], skip_special_tokens=True)
        assert len(e.doc) <= SETTINGS.max_doc_tokens
        window = len(e.src) + len(e.doc)
        assert window <= SETTINGS.max_window
        assert window >= SETTINGS.min_window or len(e.src) == t  # only a document's start can cut it shorter
        assert len(example_ids(e, "append", MarkIds(1, 2))) <= SETTINGS.context_budget


def test_a_target_never_retrieves_from_its_own_document(examples, docs, tok) -> None:
    assert sum(1 for e in examples if e.doc) > 0.5 * len(examples)  # stop-word-only queries retrieve nothing
    assert all(pid.rsplit("#", 1)[0] != e.source for e in examples for pid in e.passage_ids)

    # A retriever that always ranks the target's own document first (the copying shortcut).
    def own_first(query: str, k: int) -> list[Passage]:
        ranked = sorted(docs, key=lambda d: d.text.find(query) < 0)
        return [Passage(d.text[:200], id=d.source, metadata={"source": d.source}) for d in ranked][:k]

    got = build_examples(docs, tok, own_first, SETTINGS, max_examples=30, progress=False)
    assert got and all(e.passage_ids and e.passage_ids[0] != e.source for e in got)

    # When only the own document matches, the example gets no passage rather than a leaked one.
    def only_own(query: str, k: int) -> list[Passage]:
        return [Passage(d.text, id=d.source, metadata={"source": d.source}) for d in docs if query in d.text][:k]

    got = build_examples(docs, tok, only_own, SETTINGS, max_examples=30, progress=False)
    assert all(not e.doc and not e.passage_ids for e in got)


def test_excluding_retriever_asks_for_more_until_k_remain() -> None:
    calls = []

    def ranked(query: str, k: int) -> list[Passage]:
        calls.append(k)
        pool = [Passage(f"own {i}", metadata={"source": "a"}) for i in range(40)] + [
            Passage("other", metadata={"source": "b"})
        ]
        return pool[:k]

    assert [p.text for p in ExcludingRetriever(ranked, overfetch=2)("q", 1, "a")] == ["other"]
    assert calls == [2, 8, 32, 128]


def test_passages_without_a_source_are_refused(docs, tok) -> None:
    with pytest.raises(RetrievalError, match="metadata\\['source'\\]"):
        build_examples(docs, tok, lambda q, k: [Passage("x")], SETTINGS, max_examples=2, progress=False)


def test_layouts_marks_on_and_off(examples) -> None:
    e = next(e for e in examples if e.doc)
    marks = MarkIds(901, 902)
    assert example_ids(e, "none", marks) == e.src + e.tgt
    assert example_ids(e, "append", marks) == e.src + [901] + e.doc + [902] + e.tgt
    assert example_ids(e, "append", None) == e.src + e.doc + e.tgt
    assert example_ids(e, "prepend", marks) == [901] + e.doc + [902] + e.src + e.tgt
    assert example_ids(e, "prepend", None) == e.doc + e.src + e.tgt
    with pytest.raises(ConfigError):
        example_ids(e, "sideways", None)


def test_validation_split_keeps_documents_apart(docs, tok, tmp_path) -> None:
    train_docs, val_docs = split_documents(docs, 0.25, seed=3)
    assert {d.source for d in train_docs}.isdisjoint(d.source for d in val_docs) and len(val_docs) == 2
    tr, va, info = prepare_examples(
        tok, [sample_corpus_dir()], settings=SETTINGS, val_fraction=0.25, seed=3, chunk_tokens=32, progress=False
    )
    assert {e.source for e in tr}.isdisjoint(e.source for e in va) and va
    assert info["val_documents"] == 2
    save_examples(tmp_path / "ex.jsonl.gz", tr, {"info": info})
    loaded, header = load_examples(tmp_path / "ex.jsonl.gz")
    assert loaded == tr and header["summary"]["examples"] == len(tr) and header["info"]["seed"] == 3
    # a subset is seeded, keeps file order, spans documents and is recorded in the header
    sub, sub_header = load_examples(tmp_path / "ex.jsonl.gz", max_examples=5, seed=1)
    assert sub == load_examples(tmp_path / "ex.jsonl.gz", max_examples=5, seed=1)[0]
    assert sub != load_examples(tmp_path / "ex.jsonl.gz", max_examples=5, seed=2)[0]
    assert [tr.index(e) for e in sub] == sorted(tr.index(e) for e in sub) and len({e.source for e in sub}) > 1
    assert sub_header["subset"] == {"examples": 5, "of": len(tr), "seed": 1}
    assert load_examples(tmp_path / "ex.jsonl.gz", max_examples=10**6)[0] == tr
    with pytest.raises(ConfigError, match="at least 1"):
        load_examples(tmp_path / "ex.jsonl.gz", max_examples=0)


def test_bad_settings_and_files_are_explained(tmp_path, docs, tok) -> None:
    with pytest.raises(ConfigError, match="min_window"):
        ExampleSettings(context_budget=64, min_window=256)
    with pytest.raises(ConfigError, match="first_target"):
        build_examples(docs, tok, lambda q, k: [], ExampleSettings(first_target=100_000), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl.gz")


# --------------------------------------------------------------------------- scoring
def test_left_padded_batches_score_like_single_examples(examples) -> None:
    model, tok = make_model("llama", marks=True)
    marks = find_mark_ids(tok)
    batch = examples[:5]
    together = target_nll(model, batch, "append", marks, tok.pad_token_id, [marks.left, marks.right])
    for i, e in enumerate(batch):
        alone = target_nll(model, [e], "append", marks, tok.pad_token_id, [marks.left, marks.right])
        torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)
    # the marks are outside the softmax: the same as a log-softmax over the other ids
    ids = torch.tensor([example_ids(batch[0], "append", marks)])
    logits = model(ids).logits[0, -SETTINGS.target_tokens - 1 : -1]
    keep = [i for i in range(logits.shape[-1]) if i not in (marks.left, marks.right)]
    logp = torch.log_softmax(logits[:, keep], -1)
    expected = -logp[torch.arange(len(batch[0].tgt)), [keep.index(t) for t in batch[0].tgt]]
    torch.testing.assert_close(together[0], expected, atol=1e-4, rtol=1e-4)
    padded = collate([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert padded["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert padded["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


# --------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_changes_only_lora_and_the_mark_rows(base_dir, examples, tmp_path) -> None:
    model, tok = _load_base(base_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, tok, examples[:40], tmp_path / "a", TrainConfig(**FAST), examples[40:56], SETTINGS, "tiny")
    val = [e["val_loss"] for e in result.log if "val_loss" in e]
    assert val[-1] < val[0] and result.steps == 6 and result.stopped_early is None
    peft_model = model  # trained in place and wrapped by PEFT
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    compared = set()
    for name, param in base.named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        key = name.replace(".base_layer", "").replace(".token_adapter", "")
        if key in before:
            compared.add(key)
            old = before[key]
            if param.shape != old.shape:  # the embedding grew by the two mark rows; old rows untouched
                assert torch.equal(param[: old.shape[0]], old), name
            else:
                assert torch.equal(param, old), f"base weight {name} changed"
    assert compared == set(before)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    # The effective embedding differs from the base only in the two mark rows.
    merged = FlashBackModel.from_pretrained(str(base_dir), adapter=tmp_path / "a").model
    grown = merged.get_input_embeddings().weight
    old = before["model.embed_tokens.weight"]
    assert torch.equal(grown[: old.shape[0]], old)
    marks = find_mark_ids(tok)
    assert [marks.left, marks.right] == [old.shape[0], old.shape[0] + 1]
    assert not torch.allclose(grown[old.shape[0] :], torch.zeros_like(grown[old.shape[0] :]))
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "flashback_adapter.json", "loss.png"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files) and "checkpoints" not in files
    assert "README.md" not in files  # no empty model card naming this machine's paths
    manifest = json.loads((tmp_path / "a" / "flashback_adapter.json").read_text())
    assert manifest["flashback_config"]["mode"] == "append" and manifest["flashback_config"]["marks"] is True
    assert manifest["mark_token_ids"] == [marks.left, marks.right]
    record = manifest["extra"]["training"]
    assert record["hardware"]["device"] == "cpu" and record["train_data"]["examples"] == 40
    assert record["final_val_loss"] == pytest.approx(val[-1])


def test_saved_adapter_loads_back_to_identical_logits(base_dir, examples, tmp_path) -> None:
    model, tok = _load_base(base_dir)
    train(model, tok, examples[:16], tmp_path / "a", TrainConfig(**FAST), (), SETTINGS, "tiny", progress=False)
    model.eval()
    marks = find_mark_ids(tok)
    ids = torch.tensor([example_ids(examples[3], "append", marks)])
    with torch.no_grad():
        expected = model(ids).logits
    fb = FlashBackModel.from_pretrained(str(base_dir), adapter=tmp_path / "a")
    assert fb.mark_ids == marks and fb.config.mode == "append" and fb.config.marks is True
    keep = [i for i in range(expected.shape[-1]) if i not in (marks.left, marks.right)]
    with torch.no_grad():
        # Mark logits are masked everywhere (never generated, outside the loss), so only the others count;
        # with tied embeddings the merged head also carries the trained mark rows.
        torch.testing.assert_close(fb.model(ids).logits[..., keep], expected[..., keep], atol=1e-5, rtol=1e-5)
    # the prepend adapter restores its own settings
    model, tok = _load_base(base_dir)
    cfg = TrainConfig(**{**FAST, "layout": "prepend", "steps": 2})
    train(model, tok, examples[:8], tmp_path / "p", cfg, (), SETTINGS, "tiny", progress=False)
    assert FlashBackModel.from_pretrained(str(base_dir), adapter=tmp_path / "p").config.mode == "prepend"


def test_adapter_for_another_base_is_refused(base_dir, examples, tmp_path) -> None:
    model, tok = _load_base(base_dir)
    train(model, tok, examples[:8], tmp_path / "a", TrainConfig(**{**FAST, "steps": 1}), progress=False)
    other_dir = save_tiny_base(tmp_path / "other", seed=5)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        FlashBackModel.from_pretrained(str(other_dir), adapter=tmp_path / "a")


def test_no_marks_training_adds_no_tokens(base_dir, examples, tmp_path) -> None:
    model, tok = _load_base(base_dir)
    vocab = len(tok)
    cfg = TrainConfig(**{**FAST, "marks": False, "steps": 2})
    train(model, tok, examples[:8], tmp_path / "n", cfg, (), SETTINGS, "tiny", progress=False)
    fb = FlashBackModel.from_pretrained(str(base_dir), adapter=tmp_path / "n")
    assert len(fb.tokenizer) == vocab and fb.mark_ids is None and fb.config.marks is False


def test_resume_continues_from_the_checkpoint_step(base_dir, examples, tmp_path) -> None:
    cfg = TrainConfig(**{**FAST, "lora_dropout": 0.0})
    model, tok = _load_base(base_dir)
    full = train(model, tok, examples[:24], tmp_path / "full", cfg, examples[24:30], SETTINGS, "tiny", progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_3(entry):
        if entry["step"] == 3:
            raise Interrupt

    model, tok = _load_base(base_dir)
    with pytest.raises(Interrupt):
        train(model, tok, examples[:24], tmp_path / "cut", cfg, examples[24:30], SETTINGS, on_step=stop_at_3)
    assert (tmp_path / "cut" / "checkpoints" / "step-2" / "state.json").is_file()
    model, tok = _load_base(base_dir)
    with pytest.raises(ConfigError, match="--resume"):
        train(model, tok, examples[:24], tmp_path / "cut", cfg, examples[24:30], SETTINGS, progress=False)
    other = TrainConfig(**{**FAST, "lora_dropout": 0.0, "lr": 1e-3})
    with pytest.raises(ConfigError, match="different settings"):
        train(model, tok, examples[:24], tmp_path / "cut", other, resume=True, progress=False)
    model, tok = _load_base(base_dir)
    steps_seen = []
    resumed = train(
        model, tok, examples[:24], tmp_path / "cut", cfg, examples[24:30], SETTINGS, "tiny",
        resume=True, progress=False, on_step=lambda e: steps_seen.append(e["step"]),
    )  # fmt: skip
    assert steps_seen == [3, 4, 5, 6]
    assert [e.get("loss") for e in resumed.log] == pytest.approx([e.get("loss") for e in full.log], abs=1e-5)
    assert resumed.final_val_loss == pytest.approx(full.final_val_loss, abs=1e-5)
    model, tok = _load_base(base_dir)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(model, tok, examples[:24], tmp_path / "new", cfg, resume=True, progress=False)


class _Payload:
    """Unpickling this writes a file: the proof that a checkpoint was never unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_checkpoints_hold_no_pickle_and_foreign_ones_are_never_loaded(base_dir, examples, tmp_path) -> None:
    import pickle

    model, tok = _load_base(base_dir)
    cfg = TrainConfig(**{**FAST, "steps": 50, "max_minutes": 1e-6})
    train(model, tok, examples[:8], tmp_path / "t", cfg, progress=False)
    folder = tmp_path / "t" / "checkpoints" / "step-1"
    assert sorted(f.name for f in folder.iterdir()) == ["state.json", "state.safetensors"]
    assert json.loads((folder / "state.json").read_text())["format"] == "flashback-train-checkpoint"
    # a planted pickle beside it: refused before anything is read
    marker = tmp_path / "pwned.txt"
    (tmp_path / "t" / "checkpoints" / "step-2.pt").write_bytes(pickle.dumps(_Payload(marker)))
    model, tok = _load_base(base_dir)
    with pytest.raises(ConfigError, match="never loaded"):
        train(model, tok, examples[:8], tmp_path / "t", cfg, resume=True, progress=False)
    assert not marker.exists()
    (tmp_path / "t" / "checkpoints" / "step-2.pt").unlink()
    # a damaged record or tensor file: a clear error naming the folder
    (folder / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="state.json"):
        train(model, tok, examples[:8], tmp_path / "t", cfg, resume=True, progress=False)
    (folder / "state.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not a checkpoint"):
        train(model, tok, examples[:8], tmp_path / "t", cfg, resume=True, progress=False)


def test_ctrl_c_leaves_a_checkpoint_to_resume_from(base_dir, examples, tmp_path) -> None:
    def ctrl_c(entry):
        if entry["step"] == 3:
            raise KeyboardInterrupt

    model, tok = _load_base(base_dir)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, examples[:8], tmp_path / "k", TrainConfig(**FAST), progress=False, on_step=ctrl_c)
    assert (tmp_path / "k" / "checkpoints" / "step-3" / "state.safetensors").is_file()
    model, tok = _load_base(base_dir)
    assert train(model, tok, examples[:8], tmp_path / "k", TrainConfig(**FAST), resume=True, progress=False).steps == 6


def test_time_budget_stops_with_a_checkpoint(base_dir, examples, tmp_path) -> None:
    model, tok = _load_base(base_dir)
    cfg = TrainConfig(**{**FAST, "steps": 50, "max_minutes": 1e-6})
    result = train(model, tok, examples[:8], tmp_path / "t", cfg, progress=False)
    assert result.steps == 1 and "time budget" in result.stopped_early
    assert (tmp_path / "t" / "checkpoints" / "step-1" / "state.safetensors").is_file()
    assert (tmp_path / "t" / "adapter_model.safetensors").is_file()
    # the next session continues with another budget (and the rest of the settings unchanged)
    model, tok = _load_base(base_dir)
    more = TrainConfig(**{**FAST, "steps": 50, "max_minutes": 60.0, "eval_every": 7})
    assert train(model, tok, examples[:8], tmp_path / "t", more, resume=True, progress=False).steps == 50


def test_unknown_target_modules_are_refused_before_the_model_changes(base_dir, examples, tmp_path) -> None:
    model, tok = _load_base(base_dir)
    rows, vocab = model.get_input_embeddings().weight.shape[0], len(tok)
    with pytest.raises(ConfigError, match=r"target modules \['qproj'\] match no module.*q_proj"):
        train(model, tok, examples[:4], tmp_path / "a", TrainConfig(**{**FAST, "target_modules": ["qproj"]}))
    assert (model.get_input_embeddings().weight.shape[0], len(tok)) == (rows, vocab)  # no marks were added
    assert not (tmp_path / "a").exists()


def test_init_adapter_starts_as_the_same_function_even_when_wider(base_dir, examples, tmp_path) -> None:
    """--init-adapter: a run of higher rank, more target modules and another alpha / r starts where the
    adapter is (the rank sweep of issue 14 warm-starts r=16 from the r=8 recipe); a wider adapter is refused."""
    val = examples[40:56]
    narrow = {**FAST, "steps": 2, "lora_r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    model, tok = _load_base(base_dir)
    first = train(
        model, tok, examples[:16], tmp_path / "narrow", TrainConfig(**narrow, save_dtype="float32"), val, SETTINGS,
        "tiny", progress=False,
    )  # fmt: skip
    same = {**FAST, "steps": 1, "init_adapter": str(tmp_path / "narrow")}
    for name, cfg in {
        "same": TrainConfig(**{**narrow, **same}),
        "wide": TrainConfig(**{**FAST, **same, "lora_r": 8, "lora_alpha": 16}),  # all projections, half the scale
    }.items():
        model, tok = _load_base(base_dir)
        result = train(model, tok, examples[:16], tmp_path / name, cfg, val, SETTINGS, "tiny", progress=False)
        assert result.log[0]["val_loss"] == pytest.approx(first.final_val_loss, abs=1e-6), name
    # runs that share their start (a sweep) can skip the validation before the first step
    model, tok = _load_base(base_dir)
    cfg = TrainConfig(**{**narrow, **same, "steps": 3, "initial_eval": False})
    log = train(model, tok, examples[:16], tmp_path / "skip", cfg, val, SETTINGS, "tiny", progress=False).log
    assert [e["step"] for e in log if "val_loss" in e] == [3]
    record = json.loads((tmp_path / "skip" / "training_log.json").read_text())["record"]
    assert record["initial_val_loss"] is None and record["final_val_loss"] == log[-1]["val_loss"]
    assert first.log[0]["val_loss"] != pytest.approx(first.final_val_loss, abs=1e-3)  # the adapter learned
    model, tok = _load_base(base_dir)
    with pytest.raises(ConfigError, match=r"r=8 on .*this run uses r=4 .*at most this rank"):
        train(model, tok, examples[:4], tmp_path / "x", TrainConfig(**narrow, init_adapter=str(tmp_path / "wide")))
    assert not (tmp_path / "x").exists()


def test_train_config_validation() -> None:
    with pytest.raises(ConfigError, match="layout"):
        TrainConfig(layout="none")
    with pytest.raises(ConfigError, match="multiple"):
        TrainConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)


# --------------------------------------------------------------------------- evaluation
def test_bootstrap_intervals_and_paired_ratios() -> None:
    rng = torch.Generator().manual_seed(0)
    a = (torch.rand(400, generator=rng) * 4 + 30).numpy()
    stats = bootstrap({"a": a, "b": a * 1.1}, tokens_per_example=16, reference="a")
    assert stats["a"]["ci_low"] < stats["a"]["ppl"] < stats["a"]["ci_high"]
    assert stats["a"]["ratio_to_reference"] == 1.0
    assert stats["b"]["ppl"] > stats["a"]["ppl"] and stats["b"]["ratio_ci_low"] > 1.0


def test_paper_rows_name_what_is_skipped() -> None:
    rows, skipped = paper_rows("fb", None, None)
    assert [r.name for r in rows] == [
        "no retrieval",
        "prepend",
        "append",
        "append + LoRA + MT (FlashBack)",
        "isolated (untrained)",
    ]
    assert skipped == [
        "prepend + LoRA + MT",
        "append + LoRA",
        "isolated + prepend adapter",
        "isolated + adapter",
        "no retrieval + isolated adapter",
    ]


def test_eval_scores_every_row_on_the_same_tokens_and_resumes(base_dir, examples, tmp_path, monkeypatch) -> None:
    model, tok = _load_base(base_dir)
    train(model, tok, examples[:16], tmp_path / "fb", TrainConfig(**{**FAST, "steps": 2}), progress=False)
    rows, _ = paper_rows(str(tmp_path / "fb"), None, None)
    ex = examples[:12]
    result = run_eval(ex, rows, tmp_path / "out", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    assert result["scored_tokens"] == 12 * SETTINGS.target_tokens
    assert [r["name"] for r in result["rows"]] == [r.name for r in rows]
    # the no-retrieval row is exp(mean NLL) of src + tgt under the base model
    base, _ = _load_base(base_dir)
    nll = target_nll(base, ex, "none", None, tok.pad_token_id)
    assert result["rows"][0]["ppl"] == pytest.approx(float(torch.exp(nll.detach().mean())), rel=1e-4)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"ppl.{ext}").is_file()
    assert "| append + LoRA + MT (FlashBack) |" in (tmp_path / "out" / "ppl.md").read_text()

    import flashback_integrations.training.perplexity as evaluation

    def boom(*a, **k):
        raise AssertionError("finished rows must not be scored again")

    monkeypatch.setattr(evaluation, "score_row", boom)
    again = run_eval(ex, rows, tmp_path / "out", "ppl", str(base_dir), "cpu", progress=False)
    assert again["rows"] == result["rows"]


def test_eval_stopped_mid_row_resumes_from_its_last_save(base_dir, examples, tmp_path, monkeypatch) -> None:
    import flashback_integrations.training.perplexity as evaluation

    rows = [PplRow("no retrieval", "none"), PplRow("append", "append")]
    ex = examples[:12]  # batches of 5: 5 + 5 + 2 per row
    whole = run_eval(ex, rows, tmp_path / "whole", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 5:  # the second batch of the second row
            raise KeyboardInterrupt
        return target_nll(*args, **kwargs)

    monkeypatch.setattr(evaluation, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(evaluation, "target_nll", counted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(ex, rows, tmp_path / "stopped", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    saved = json.loads((tmp_path / "stopped" / "ppl.partial.json").read_text())
    assert len(saved["rows"]) == 1 and [len(v) for v in saved["in_progress"].values()] == [5]
    calls.clear()
    resumed = run_eval(ex, rows, tmp_path / "stopped", "ppl", str(base_dir), "cpu", batch_size=5, progress=False)
    assert calls == [5, 2]  # only what the stopped run had not saved
    assert resumed["rows"] == whole["rows"]


def test_marks_row_without_marks_is_an_error(base_dir, examples) -> None:
    from flashback_integrations.training.perplexity import score_row

    with pytest.raises(ConfigError, match="uses marks"):
        score_row(PplRow("x", "append", None, True), examples[:2], str(base_dir), "cpu")


# --------------------------------------------------------------------------- command line
def test_cli_data_build_train_and_eval(base_dir, tmp_path) -> None:
    runner = CliRunner()
    small = [
        "--context-budget", "128", "--target-tokens", "8", "--first-target", "64", "--query-tokens", "24",
        "--max-doc-tokens", "24", "--min-window", "48", "--chunk-tokens", "32",
    ]  # fmt: skip
    common = ["--model", str(base_dir), "--docs", str(sample_corpus_dir())]
    r = runner.invoke(
        app,
        ["data", "build", str(tmp_path / "train.jsonl.gz"), *common, "--val-out", str(tmp_path / "val.jsonl.gz"),
         "--val-fraction", "0.25", *small],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["train", str(tmp_path / "adapter"), "--model", str(base_dir), "--examples", str(tmp_path / "train.jsonl.gz"),
         "--val-examples", str(tmp_path / "val.jsonl.gz"), "--steps", "3", "--batch-size", "2",
         "--micro-batch-size", "1", "--eval-every", "3", "--device", "cpu", "--bf16"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "validation loss" in r.output and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((tmp_path / "adapter" / "flashback_adapter.json").read_text())
    assert manifest["flashback_config"]["stride"] == 8 and manifest["flashback_config"]["max_doc_tokens"] == 24
    assert manifest["extra"]["training"]["train_config"]["bf16"] is True  # CPU autocast on request
    r = runner.invoke(
        app,
        ["eval", "ppl", *common, *small, "--flashback-adapter", str(tmp_path / "adapter"), "--max-examples", "6",
         "--out", str(tmp_path / "eval"), "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "eval" / "ppl.json").read_text())
    assert result["scored_tokens"] == 48 and len(result["rows"]) == 5
    assert result["rows"][-1]["name"] == "isolated (untrained)" and result["rows"][-1]["ppl"] > 0
    assert result["skipped_rows"] == [
        "prepend + LoRA + MT",
        "append + LoRA",
        "isolated + prepend adapter",
        "isolated + adapter",
        "no retrieval + isolated adapter",
    ]
    # --max-examples on an example file scores a seeded subset, and says so
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"), "--max-examples", "2",
         "--row", "no retrieval", "--out", str(tmp_path / "eval"), "--stem", "sub", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    sub = json.loads((tmp_path / "eval" / "sub.json").read_text())
    assert sub["scored_tokens"] == 16 and sub["data"]["subset"]["examples"] == 2
    # an adapter trained for the other layout is refused before anything is scored
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"),
         "--prepend-adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "eval"), "--stem", "wrong",
         "--device", "cpu"],
    )  # fmt: skip
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "trained for append" in said and "--layout prepend" in said
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"),
         "--append-adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "eval"), "--stem", "wrong"],
    )  # fmt: skip
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "no-marks row but adapter" in said and "flashback train --no-marks" in said
    r = runner.invoke(
        app,
        ["eval", "ppl", "--model", str(base_dir), "--examples", str(tmp_path / "val.jsonl.gz"),
         "--flashback-adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "eval"), "--stem", "wrong"],
    )  # fmt: skip
    assert r.exit_code == 2 and "not an adapter directory" in " ".join(r.output.split())
    assert not list((tmp_path / "eval").glob("wrong*"))
    r = runner.invoke(app, ["train", str(tmp_path / "x"), "--model", str(base_dir), "--examples", "/nope.jsonl.gz"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["eval", "ppl", "--examples", str(tmp_path / "val.jsonl.gz"), "--row", "sideways"])
    assert r.exit_code == 2 and "Unknown row" in r.output


def test_evaluation_examples_retrieve_from_none_of_the_held_out_documents(tok) -> None:
    held_out = ["json.txt", "re.txt", "logging.txt"]
    ex, _, info = prepare_examples(
        tok, [sample_corpus_dir()], include=held_out, retrieval=[sample_corpus_dir()], settings=SETTINGS,
        chunk_tokens=32, progress=False, exclude_all_docs=True,
    )  # fmt: skip
    sources = {e.source for e in ex}
    assert len(sources) == 3 and any(e.passage_ids for e in ex)
    assert all(pid.rsplit("#", 1)[0] not in sources for e in ex for pid in e.passage_ids)
    assert "all target documents excluded" in info["retrieval"]


@pytest.mark.parametrize("bf16", (False, True))
def test_training_in_the_isolated_layout_learns_and_records_it(base_dir, examples, tmp_path, bf16) -> None:
    """`train --layout isolated`: the masked span batches train (fp32 and bf16 autocast) and the manifest
    says isolated, so the adapter is served and scored in that layout."""
    model, tok = _load_base(base_dir)
    out = tmp_path / "iso"
    result = train(
        model, tok, examples[:16], out, TrainConfig(**{**FAST, "layout": "isolated", "bf16": bf16}),
        val_examples=examples[16:24], progress=False,
    )  # fmt: skip
    losses = [e["val_loss"] for e in result.log if "val_loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)
    manifest = json.loads((out / "flashback_adapter.json").read_text())
    assert manifest["flashback_config"]["mode"] == "isolated"


def test_eval_isolated_rows_read_with_the_given_tail(base_dir, examples, tmp_path) -> None:
    from flashback_integrations.training.perplexity import with_tail

    rows = with_tail([PplRow("no retrieval", "none"), PplRow("isolated (untrained)", "isolated")], 4)
    assert [r.name for r in rows] == ["no retrieval", "isolated (untrained) (tail 4)"]
    ex = examples[:6]
    result = run_eval(ex, rows, tmp_path / "out", "ppl", str(base_dir), "cpu", batch_size=3, progress=False)
    base, tok = _load_base(base_dir)
    nll = target_nll(base, ex, "isolated", None, tok.pad_token_id, tail_tokens=4)
    assert result["rows"][1]["ppl"] == pytest.approx(float(torch.exp(nll.detach().mean())), rel=1e-4)
    with pytest.raises(ConfigError, match="tail_tokens"):
        with_tail(rows, 0)


def test_eval_merges_rows_scored_in_parallel_under_another_stem(base_dir, examples, tmp_path, monkeypatch) -> None:
    import flashback_integrations.training.perplexity as evaluation

    rows = [PplRow("no retrieval", "none"), PplRow("append", "append")]
    ex = examples[:6]
    whole = run_eval(ex, rows, tmp_path, "whole", str(base_dir), "cpu", batch_size=3, progress=False)
    run_eval(ex, rows[1:], tmp_path, "second", str(base_dir), "cpu", batch_size=3, progress=False)  # in parallel
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return target_nll(*args, **kwargs)

    monkeypatch.setattr(evaluation, "target_nll", counted)
    merged = run_eval(ex, rows, tmp_path, "first", str(base_dir), "cpu", batch_size=3, progress=False,
                      merge_from=[tmp_path / "second.partial.json"])  # fmt: skip
    assert calls == [3, 3]  # only the first row was scored here
    assert merged["rows"] == whole["rows"]
    other = run_eval(examples[6:9], rows[:1], tmp_path, "other", str(base_dir), "cpu", progress=False)
    assert other["examples"] == 3
    with pytest.raises(ConfigError, match="other examples or another model"):
        run_eval(ex, rows, tmp_path, "third", str(base_dir), "cpu", progress=False,
                 merge_from=[tmp_path / "other.partial.json"])  # fmt: skip


@pytest.fixture(scope="module")
def marked_teacher(base_dir, examples, tmp_path_factory):
    """A prepend + marks adapter (two steps) merged into a second base: the distillation teacher."""
    out = tmp_path_factory.mktemp("teacher") / "prepend"
    model, tok = _load_base(base_dir)
    train(model, tok, examples[:8], out, TrainConfig(**{**FAST, "layout": "prepend", "steps": 2}), progress=False)
    return load_for_training(str(base_dir), out)[2]


def _distill_loss_by_hand(student, teacher, batch, layout, marks, pad_id, w=0.5, k=20):
    excluded = [marks.left, marks.right] if marks else []
    s = target_logprobs(student, batch, layout, marks, pad_id, excluded)
    t_ex = [teacher.marks.left, teacher.marks.right]
    t = target_logprobs(teacher.model, batch, "prepend", teacher.marks, pad_id, t_ex)[..., : s.shape[-1]]
    ce = -s.gather(-1, torch.tensor([e.tgt for e in batch])[..., None]).mean()
    top, at = t.topk(k, dim=-1)
    return (1 - w) * ce + w * (top.exp() * (top - s.gather(-1, at))).sum(-1).mean(), ce


def test_distilling_from_itself_leaves_only_the_cross_entropy(marked_teacher, examples, base_dir) -> None:
    """KL(p || p) = 0: a student that is its teacher, reading the same layout, pays only (1-w) CE."""
    tok = _load_base(base_dir)[1]
    marks = marked_teacher.marks
    cfg = TrainConfig(**{**FAST, "layout": "prepend", "distill_weight": 0.5})
    batch = examples[:4]
    with torch.no_grad():
        loss = training_loss(marked_teacher.model, batch, cfg, marks, pad_id_of(tok), [marks.left, marks.right],
                             False, marked_teacher)  # fmt: skip
        _, ce = _distill_loss_by_hand(marked_teacher.model, marked_teacher, batch, "prepend", marks, pad_id_of(tok))
    assert float(loss) == pytest.approx(0.5 * float(ce), abs=1e-6)


def test_a_student_without_marks_distills_from_a_teacher_with_them(marked_teacher, examples, base_dir, tmp_path):
    """append + LoRA (no marks) distilled from prepend + LoRA + MT: the teacher reads the passage framed by
    its own marks, never predicts them, and its vocabulary is cut to the student's (it used to index past it)."""
    model, tok = _load_base(base_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert marked_teacher.marks is not None and marked_teacher.marks.left >= vocab
    marked_teacher = Teacher(copy.deepcopy(marked_teacher.model), marked_teacher.marks)  # the fixture stays as is
    with torch.no_grad():  # make the marks the teacher's likeliest tokens, so an unmasked top-k would pick them
        marked_teacher.model.get_output_embeddings().weight[vocab:] *= 50
    cfg = TrainConfig(**{**FAST, "marks": False, "distill_weight": 0.5})
    batch = examples[:4]
    with torch.no_grad():
        loss = training_loss(model, batch, cfg, None, pad_id_of(tok), [], False, marked_teacher)
        expected, _ = _distill_loss_by_hand(model, marked_teacher, batch, "append", None, pad_id_of(tok))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    result = train(model, tok, examples[:8], tmp_path / "s", dataclasses.replace(cfg, steps=2), (),
                   SETTINGS, "tiny", progress=False, teacher=marked_teacher)  # fmt: skip
    assert result.steps == 2 and all(math.isfinite(e["loss"]) for e in result.log if "loss" in e)
