"""Activated adapters: LoRA that is on only for the tokens from the passage on.

An adapter trained this way leaves the text's keys and values exactly the base model's: a call
without retrieval is plain base-model decoding, and in the isolated layout the head of the cache
is what plain decoding would hold. Only the passage segments and the tail that reads them go
through the adapter (PEFT's activated LoRA idea, ``alora_invocation_tokens``, with a per-token mask
instead of a suffix, because the engine's one-forward retrieval feeds the new passages before the
head tokens it recomputes).

The mask travels in a :class:`contextvars.ContextVar`, so concurrent calls on one model (threads,
asyncio tasks) each see their own: PEFT's own aLoRA registers hooks per call on the shared modules,
which is not safe across threads. A forward with no mask (outside :func:`lora_gate`, or
``lora_gate(None)``: every token off) skips the LoRA layers altogether rather than multiplying their
output by zero, so a call without retrieval runs at the base model's speed, not only with its logits.
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


_SKIPPING: dict[type, type] = {}


def _skipping(layer_class: type) -> type:
    """``layer_class`` whose forward is the base layer's alone while no :func:`lora_gate` mask is set
    (what PEFT's own forward does with adapters disabled); with a mask, PEFT's forward as it is. The
    adapter's enabled state is not touched, so PEFT's status and ``disable_adapter()`` see it as it is."""
    if layer_class not in _SKIPPING:

        def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if _GATE.get() is None and not args and not kwargs and not self.merged:
                return self.base_layer(x)
            return layer_class.forward(self, x, *args, **kwargs)

        _SKIPPING[layer_class] = type(
            f"Activated{layer_class.__name__}", (layer_class,), {"forward": forward, "__module__": __name__}
        )
    return _SKIPPING[layer_class]


def activate(peft_model: Any) -> int:
    """Gate every LoRA ``B`` projection of ``peft_model`` by the current :func:`lora_gate` mask, and let
    the LoRA layers skip their adapter path in forwards without a mask.

    Returns the number of gated projections (0 means the model has no LoRA layers: an error for the
    caller). Idempotent. The adapter cannot be merged afterwards: merged weights have no token mask.
    """
    if getattr(peft_model, _HOOKED, None):
        return len(getattr(peft_model, _HOOKED))
    handles = []
    for module in list(peft_model.modules()):
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, torch.nn.ModuleDict) and isinstance(getattr(module, "_disable_adapters", None), bool):
            for linear in lora_b.values():
                handles.append(linear.register_forward_hook(_gate_output))
            module.__class__ = _skipping(type(module))
    setattr(peft_model, _HOOKED, handles)
    return len(handles)


def is_activated(model: Any) -> bool:
    return bool(getattr(model, _HOOKED, None))
