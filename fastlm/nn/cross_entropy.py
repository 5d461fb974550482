"""Drop-in cross-entropy losses.

:class:`CrossEntropyLoss` subclasses ``torch.nn.CrossEntropyLoss`` (constructor, buffers,
``state_dict`` and ``isinstance`` checks are torch's own) for class-index targets on (N, V)
logits; :class:`LinearCrossEntropyLoss` fuses the output projection into the loss.

Both take fastlm's options beside torch's: ``z_loss``, ``softcap`` (final-logit
soft-capping), and ``return_z_loss`` / ``return_token_accuracy``, with which ``forward``
returns a :class:`fastlm.ops.cross_entropy.CrossEntropyOutput` ``(loss, z_loss,
token_accuracy)`` instead of the loss (see :func:`fastlm.ops.cross_entropy`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops
from fastlm.ops.cross_entropy import CrossEntropyOutput


def _options_repr(module) -> list[str]:
    parts = [f"ignore_index={module.ignore_index}", f"reduction={module.reduction!r}"]
    for name in ("label_smoothing", "z_loss", "softcap", "return_z_loss", "return_token_accuracy"):
        if getattr(module, name):
            parts.append(f"{name}={getattr(module, name)}")
    return parts


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by fastlm (see
    :func:`fastlm.ops.cross_entropy`), for (N, V) logits and (N,) class-index
    targets, with class ``weight`` on every backend. ``z_loss`` adds the PaLM z-loss;
    ``softcap`` soft-caps the logits first."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy

    def forward(self, input: Tensor, target: Tensor) -> Tensor | CrossEntropyOutput:
        return ops.cross_entropy(
            input,
            target,
            self.ignore_index,
            self.label_smoothing,
            self.reduction,
            self.z_loss,
            weight=self.weight,
            softcap=self.softcap,
            return_z_loss=self.return_z_loss,
            return_token_accuracy=self.return_token_accuracy,
        )

    def extra_repr(self) -> str:
        return ", ".join(_options_repr(self))


class LinearCrossEntropyLoss(torch.nn.Module):
    """``cross_entropy(F.linear(hidden, weight, bias), target)`` without materializing the
    (N, V) logits (see :func:`fastlm.ops.linear_cross_entropy`). Holds no
    parameters: pass the output projection's weight (e.g. ``lm_head.weight``). Class
    weights, ``ce_weight`` (V,), are a buffer (in the ``state_dict`` when given, as torch's
    ``CrossEntropyLoss.weight``)."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
        ce_weight: Tensor | None = None,
        softcap: float | None = None,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.register_buffer("ce_weight", ce_weight)
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor | CrossEntropyOutput:
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
            ce_weight=self.ce_weight,
            softcap=self.softcap,
            return_z_loss=self.return_z_loss,
            return_token_accuracy=self.return_token_accuracy,
        )

    def extra_repr(self) -> str:
        parts = _options_repr(self)
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)
