"""Drop-in cross-entropy losses.

:class:`CrossEntropyLoss` subclasses ``torch.nn.CrossEntropyLoss`` (constructor, buffers,
``state_dict`` and ``isinstance`` checks are torch's own) for class-index targets on (N, V)
logits; :class:`LinearCrossEntropyLoss` fuses the output projection into the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by fastlm (see
    :func:`fastlm.ops.cross_entropy`), for (N, V) logits and (N,) class-index
    targets. A class ``weight`` is served by the torch backend only (forcing ``triton``
    with one raises ``BackendUnavailable`` saying so). ``z_loss`` adds the PaLM z-loss.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(
            input,
            target,
            self.ignore_index,
            self.label_smoothing,
            self.reduction,
            self.z_loss,
            weight=self.weight,
        )

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        return ", ".join(parts)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``cross_entropy(F.linear(hidden, weight, bias), target)`` without materializing the
    (N, V) logits (see :func:`fastlm.ops.linear_cross_entropy`). Holds no
    parameters: pass the output projection's weight (e.g. ``lm_head.weight``)."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        return ops.linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            self.ignore_index,
            self.label_smoothing,
            self.reduction,
            self.z_loss,
            self.chunk_size,
        )

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)
