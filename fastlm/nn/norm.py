"""Drop-in LayerNorm and RMSNorm.

They subclass the torch modules, so constructor, parameters, ``state_dict`` keys,
``reset_parameters``, ``extra_repr`` and ``isinstance`` checks are torch's own; only
``forward`` runs fastlm's kernels. ``forward`` also takes an optional ``residual``: then it
returns ``(norm(x + residual), x + residual)`` in one fused pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by fastlm (see :func:`fastlm.ops.layer_norm`)."""

    def forward(self, input: Tensor, residual: Tensor | None = None):
        # Positional arguments: keywords cost a visible share of a small call.
        return ops.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, residual
        )


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by fastlm (see :func:`fastlm.ops.rms_norm`)."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps, residual)


class GemmaRMSNorm(torch.nn.Module):
    """transformers' ``GemmaRMSNorm`` / ``Gemma2RMSNorm`` computed by fastlm: same
    constructor ``(hidden_size, eps=1e-6)`` (transformers 5.x's names; older releases
    called the first ``dim``), one parameter ``weight`` initialised to zeros (the scale
    is ``1 + weight``), same ``state_dict`` keys, ``extra_repr`` and outputs (float32 math,
    ``1 + weight`` in float32, one rounding to the input's dtype at the end; see
    :func:`fastlm.ops.rms_norm`'s ``offset``). ``forward`` also takes an optional
    ``residual``, as :class:`RMSNorm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return ops.rms_norm(
            x, self.weight.shape, self.weight, self.eps, residual=residual, offset=1.0
        )

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
