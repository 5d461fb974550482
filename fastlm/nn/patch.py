"""``fastlm.patch(model)``: swap torch layers for fastlm drop-ins, in place."""

from __future__ import annotations

import torch

from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.norm import LayerNorm, RMSNorm

# Exact torch classes only: a subclass may have its own forward, and fastlm's drop-ins are
# subclasses themselves.
_REPLACEMENTS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.MultiheadAttention: MultiheadAttention,
}


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` /
    ``torch.nn.MultiheadAttention`` in ``model`` (``model`` itself included) with fastlm's,
    in place, and return ``model``.

    Each drop-in subclasses the torch class and adds no state, so the swap re-classes the
    existing module: its Parameter objects (values, device, dtype, ``requires_grad``, and any
    optimizer holding them), hooks and training flag all stay as they were.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model
