"""Scoring docs/method.md's examples: one padded batch per layout (4D masks for the isolated one), the
target tokens' log-probabilities. The trainer's loss and the evaluation's perplexity both use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.activation import lora_gate
from ..engine.layout import MarkIds, Span, find_mark_ids
from ..errors import ConfigError
from .config import TrainConfig
from .examples import Example, example_ids, example_spans


def collate(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Left-pad so every target sits at the end; padding is masked and skipped by position ids."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


def collate_spans(
    contexts: Sequence[Sequence[Span]], pad_id: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Left-padded ids, the spans' own position ids and a 4D mask: a causal span attends to everything
    before it, an isolated one to itself (and its sink, the first text token) only."""
    width = max(sum(len(s.ids) for s in spans) for spans in contexts)
    n = len(contexts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    group = torch.full((n, width), -2, dtype=torch.long)  # -2 padding, -1 text, i >= 0 segment i
    sink_at = torch.full((n,), -1, dtype=torch.long)
    for row, spans in enumerate(contexts):
        at = width - sum(len(s.ids) for s in spans)
        for index, span in enumerate(spans):
            end = at + len(span.ids)
            input_ids[row, at:end] = torch.tensor(span.ids, dtype=torch.long)
            positions[row, at:end] = torch.arange(span.start, span.start + len(span.ids))
            group[row, at:end] = index if span.isolated else -1
            if not span.isolated and sink_at[row] < 0:
                sink_at[row] = at
            at = end
        if any(s.isolated and s.sink is not None for s in spans) and sink_at[row] < 0:
            raise ConfigError("a passage sink needs a text token in the same context")
    q = torch.arange(width)
    causal = q[None, :, None] >= q[None, None, :]
    gq, gk = group[:, :, None], group[:, None, :]
    text = (gq == -1) & (gk != -2) & causal
    own = (gq >= 0) & (gq == gk) & causal
    sinks = torch.tensor([any(s.isolated and s.sink is not None for s in spans) for spans in contexts])
    sink = (gq >= 0) & sinks[:, None, None] & (q[None, None, :] == sink_at[:, None, None])
    pad_self = (gq == -2) & (q[None, :, None] == q[None, None, :])  # no all-masked rows
    allowed = (text | own | sink | pad_self)[:, None]
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def activation_gate(contexts: Sequence[Sequence[Span]], width: int, device: torch.device | str) -> torch.Tensor:
    """Where an activated adapter is on, for left-padded contexts: every token from the first
    passage segment on (the segments and the tail that reads them), nothing of a context without one."""
    gate = torch.zeros((len(contexts), width), dtype=torch.bool)
    for row, spans in enumerate(contexts):
        first = next((k for k, s in enumerate(spans) if s.isolated), None)
        if first is not None:
            gate[row, width - sum(len(s.ids) for s in spans[first:]) :] = True
    return gate.to(device)


def target_logprobs(
    model: Any,
    examples: Sequence[Example],
    layout: str,
    marks: MarkIds | None,
    pad_id: int,
    excluded_ids: Sequence[int] = (),
    autocast: bool = False,
    tail_tokens: int = 1,
) -> torch.Tensor:
    """Log-probabilities ``[examples, target_tokens, vocab]`` of the next token at every target position.

    Only the last ``target_tokens + 1`` positions get logits; ``excluded_ids`` (the marks) are
    removed from the softmax. An activated adapter (:mod:`.activation`) is on from the passage on.
    """
    n_tgt = len(examples[0].tgt)
    if any(len(e.tgt) != n_tgt for e in examples):
        raise ConfigError("All examples in a batch must have targets of the same length.")
    device = next(model.parameters()).device
    if layout == "isolated":
        contexts = [example_spans(e, marks, tail_tokens) for e in examples]
        batch = collate_spans(contexts, pad_id, device)
        gate = activation_gate(contexts, batch["input_ids"].shape[1], device)
    else:
        batch = collate([example_ids(e, layout, marks) for e in examples], pad_id, device)
        gate = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # no passage segment: the base model
    with lora_gate(gate), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch, logits_to_keep=n_tgt + 1, use_cache=False).logits[:, :-1].float()
    if excluded_ids:
        logits[..., list(excluded_ids)] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def target_nll(model: Any, examples: Sequence[Example], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Negative log-likelihood of every target token, shape (examples, target_tokens); the arguments are
    :func:`target_logprobs`'s."""
    logp = target_logprobs(model, examples, *args, **kwargs)
    targets = torch.tensor([e.tgt for e in examples], device=logp.device)
    return -logp.gather(-1, targets[..., None])[..., 0]


def pad_id_of(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def mark_id_list(tokenizer: Any, model: Any) -> list[int]:
    marks = find_mark_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    return [] if marks is None else [marks.left, marks.right]


def evaluate_loss(
    model: Any, examples: Sequence[Example], cfg: TrainConfig, marks: MarkIds | None, pad_id: int, autocast: bool
) -> float:
    """Mean target-token NLL with the training layout (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    excluded = [marks.left, marks.right] if marks else []
    with torch.no_grad():
        for i in range(0, len(examples), cfg.micro_batch_size):
            nll = target_nll(
                model,
                examples[i : i + cfg.micro_batch_size],
                cfg.layout,
                marks,
                pad_id,
                excluded,
                autocast,
                cfg.tail_tokens,
            )
            total += float(nll.sum())
            count += nll.numel()
    if was_training:
        model.train()
    return total / max(count, 1)


@dataclass(frozen=True)
class Teacher:
    """The distillation teacher: a frozen model that reads the passage prepended, framed by its *own* marks
    (a student trained without marks still learns from a prepend + LoRA + MT teacher, read as trained)."""

    model: Any
    marks: MarkIds | None


def training_loss(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    marks: MarkIds | None,
    pad_id: int,
    excluded: Sequence[int],
    autocast: bool,
    teacher: Teacher | None = None,
) -> torch.Tensor:
    """Mean target-token loss: cross-entropy, mixed with the KL to the teacher's top-k distribution
    when ``cfg.distill_weight > 0``."""
    logp = target_logprobs(model, examples, cfg.layout, marks, pad_id, excluded, autocast, cfg.tail_tokens)
    targets = torch.tensor([e.tgt for e in examples], device=logp.device)
    ce = -logp.gather(-1, targets[..., None])[..., 0].mean()
    if cfg.distill_weight == 0 or teacher is None:
        return ce
    with torch.no_grad():
        t_marks = [teacher.marks.left, teacher.marks.right] if teacher.marks else []
        t_logp = target_logprobs(teacher.model, examples, "prepend", teacher.marks, pad_id, t_marks, autocast)
        # Marks are the last rows of a vocabulary and the teacher never predicts its own (excluded above), so
        # the base vocabulary both share is a prefix: cut the teacher to the student's rows.
        top, at = t_logp[..., : logp.shape[-1]].topk(cfg.distill_top_k, dim=-1)
        p = top.exp()
    # KL(p || q) on the teacher's top-k support (p's own entropy term makes it 0 at a perfect match)
    kl = (p * (top - logp.gather(-1, at))).sum(-1).mean()
    return (1 - cfg.distill_weight) * ce + cfg.distill_weight * kl
