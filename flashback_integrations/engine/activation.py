"""Activated adapters: LoRA that is on only for the tokens from the passage on.

An adapter trained this way leaves the text's keys and values exactly the base model's: a call
without retrieval is plain base-model decoding, and in the isolated layout the head of the cache
is what plain decoding would hold. Only the passage segments and the tail that reads them go
through the adapter (PEFT's activated LoRA idea, ``alora_invocation_tokens``, with a per-token mask
instead of a suffix, because the engine's one-forward retrieval feeds the new passages before the
head tokens it recomputes).

The mask travels in a :class:`contextvars.ContextVar`, so concurrent calls on one model (threads,
asyncio tasks) each see their own: PEFT's own aLoRA registers hooks per call on the shared modules,
which is not safe across threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

ACTIVATION_PASSAGE = "passage"
"""Manifest value of ``activation``: the adapter is on from the first passage token on."""

_GATE: ContextVar[torch.Tensor | None] = ContextVar("flashback_lora_gate", default=None)
_HOOKED = "_flashback_activation_hooks"


@contextmanager
def lora_gate(mask: torch.Tensor | None) -> Iterator[None]:
    """Run the forwards inside with LoRA on where ``mask`` (``[batch, tokens]``, bool) is True.

    Outside any ``lora_gate`` (or with ``None``) an activated adapter is off: the base model."""
    token = _GATE.set(mask)
    try:
        yield
    finally:
        _GATE.reset(token)


def _gate_output(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    gate = _GATE.get()
    if gate is None:
        return output * 0
    if output.dim() != 3 or gate.shape != output.shape[:2]:
        raise RuntimeError(f"LoRA gate of shape {tuple(gate.shape)} does not fit a forward of {tuple(output.shape)}")
    return output * gate.to(device=output.device, dtype=output.dtype)[..., None]


def activate(peft_model: Any) -> int:
    """Gate every LoRA ``B`` projection of ``peft_model`` by the current :func:`lora_gate` mask.

    Returns the number of gated projections (0 means the model has no LoRA layers: an error for the
    caller). Idempotent. The adapter cannot be merged afterwards: merged weights have no token mask.
    """
    if getattr(peft_model, _HOOKED, None):
        return len(getattr(peft_model, _HOOKED))
    handles = []
    for name, module in peft_model.named_modules():
        if name.endswith("lora_B") and isinstance(module, torch.nn.ModuleDict):
            for linear in module.values():
                handles.append(linear.register_forward_hook(_gate_output))
    setattr(peft_model, _HOOKED, handles)
    return len(handles)


def is_activated(model: Any) -> bool:
    return bool(getattr(model, _HOOKED, None))
