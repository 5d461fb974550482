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
        return ops.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual
        )


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by fastlm (see :func:`fastlm.ops.rms_norm`)."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps, residual=residual)
