"""Activation checkpointing applied from outside the model (torchtitan's ``apply_ac``): the
model declares its stacks of blocks (``block_stacks``, names of ``nn.ModuleList``s) and
knows nothing of checkpointing.

A checkpointed block keeps its parameters and their names, and stays an instance of its
class (its class becomes a subclass of it), so state dicts, tensor-parallel plans and
``isinstance`` checks see no change; unlike a wrapper module, which would rename every
parameter. Its whole call is recomputed in the backward instead of its activations being
kept, hooks included, so the collectives ``fastlm.parallel`` hooks onto the blocks run
again with it.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


class Checkpointed:
    """Mixed into a block's class by :func:`apply_activation_checkpointing`: in training
    with autograd on, the call runs under non-reentrant ``torch.utils.checkpoint``."""

    def __call__(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            call = super().__call__
            return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


# One checkpointed subclass per block class, so that blocks of a class share it.
_subclasses: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    if cls not in _subclasses:
        _subclasses[cls] = type(f"Checkpointed{cls.__name__}", (Checkpointed, cls), {})
    return _subclasses[cls]


def _stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The stacks of blocks ``model`` declares in its class attribute ``block_stacks``."""
    names = getattr(type(model), "block_stacks", None)
    if names is None:
        raise ValueError(
            f"model: {type(model).__name__} declares no block_stacks (the names of its "
            f"nn.ModuleLists of blocks), so its blocks cannot be checkpointed"
        )
    return [model.get_submodule(name) for name in names]


def apply_activation_checkpointing(model: nn.Module, every: int) -> nn.Module:
    """Recompute the activations of every ``every``-th block of each of ``model``'s stacks
    (the first, the ``every + 1``-th, ...) in the backward instead of keeping them; 0: none.
    In place; applying it again replaces the previous choice. Returns ``model``."""
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"every must be a non-negative int, got {every!r}")
    for stack in _stacks(model):
        for i, block in enumerate(stack):
            if isinstance(block, Checkpointed):  # undo an earlier choice
                block.__class__ = block.__class__.__mro__[2]
            if every and i % every == 0:
                block.__class__ = _checkpointed(type(block))
    return model
