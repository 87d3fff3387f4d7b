"""The bundled trainer: the loss falls, only LoRA and the mark rows change, adapters load back exactly,
checkpoints hold no pickle and resume exactly, budgets and Ctrl-C leave a checkpoint, distillation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import make_model, save_tiny_base

from flashback_integrations import AdapterMismatchError, ConfigError, FlashBackModel
from flashback_integrations.data import sample_corpus_dir
from flashback_integrations.engine.layout import find_mark_ids
from flashback_integrations.training.examples import (
    ExampleSettings,
    build_examples,
    chunk_retriever,
    example_ids,
    load_documents,
)
from flashback_integrations.training.scoring import (
    Teacher,
    pad_id_of,
    target_logprobs,
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
