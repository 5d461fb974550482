"""Fused MLP blocks with the parameter layout of the modules they replace.

:class:`FusedMLP` holds ``fc1`` / ``fc2`` ``nn.Linear`` children, as ``timm``'s ``Mlp`` (and
any two-``Linear`` MLP) does; :class:`GatedMLP` holds ``gate_proj`` / ``up_proj`` /
``down_proj``, as Llama's MLP in Hugging Face transformers. Their ``state_dict`` keys are
therefore the originals', and either loads the other's state dict unchanged.

When a projection is not a plain ``nn.Linear`` (``fastlm.quant.quantize_`` made it a
``QuantLinear``), the block calls the projections as modules and fuses only what is left
(bias + activation + dropout), since the fused GEMMs read float weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.ops.activation import bias_act, check_activation
from fastlm.ops.mlp import fused_mlp, gated_mlp, linear_act


def _check_size(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FusedMLP(torch.nn.Module):
    """``dropout(fc2(dropout(act(fc1(x)))))`` with fc1's bias, activation and dropout in its
    GEMM's epilogue (see :func:`fastlm.ops.fused_mlp`); the hidden activation is recomputed
    in the backward instead of stored.

    Args:
        in_features, hidden_features: fc1 is ``Linear(in_features, hidden_features)``.
        out_features: fc2's outputs (default ``in_features``).
        activation: ``identity, relu, gelu`` (erf), ``gelu_tanh``, ``silu``.
        bias: biases on both linears.
        dropout: rate of both dropouts (after the activation and after fc2), as ``timm``'s
            ``Mlp(drop=...)``; off in eval mode.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_features = in_features if out_features is None else out_features
        for name, value in (
            ("in_features", in_features),
            ("hidden_features", hidden_features),
            ("out_features", out_features),
        ):
            _check_size(name, value)
        check_activation(activation)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.fc1 = torch.nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.fc2 = torch.nn.Linear(hidden_features, out_features, bias=bias, **factory)
        self.activation = activation
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        # Children read from the module table: nn.Module's attribute lookup costs a few hundred
        # ns a name, on every forward.
        modules = self._modules
        fc1, fc2 = modules["fc1"], modules["fc2"]
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            return F.dropout(fc2(dense_act(fc1, x, self.activation, p)), p)
        # A plain nn.Linear keeps weight and bias (None when absent) in its parameter table,
        # read directly: nn.Module's attribute lookup costs a few hundred ns a name.
        p1, p2 = fc1._parameters, fc2._parameters
        return fused_mlp(x, p1["weight"], p1["bias"], p2["weight"], p2["bias"], self.activation, p)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"


class GatedMLP(torch.nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, Llama's MLP, with the gate and up
    products, activation and product in one GEMM kernel (see :func:`fastlm.ops.gated_mlp`).
    ``activation="silu"`` is SwiGLU, ``"gelu"`` / ``"gelu_tanh"`` GeGLU.

    Args:
        hidden_size: model width (inputs and outputs).
        intermediate_size: width of the gated hidden layer.
        activation: ``identity, relu, gelu`` (erf), ``gelu_tanh``, ``silu``.
        bias: biases on all three linears (Llama's ``mlp_bias``).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_size("hidden_size", hidden_size)
        _check_size("intermediate_size", intermediate_size)
        check_activation(activation)
        factory = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **factory)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        modules = self._modules  # read directly, as in FusedMLP.forward
        gate, up, down = modules["gate_proj"], modules["up_proj"], modules["down_proj"]
        if type(gate) is not nn.Linear or type(up) is not nn.Linear or type(down) is not nn.Linear:
            return down(dense_act(gate, x, self.activation) * up(x))
        # Parameters read from their tables, as in FusedMLP.forward.
        pg, pu, pd = gate._parameters, up._parameters, down._parameters
        return gated_mlp(
            x,
            pg["weight"],
            pu["weight"],
            pd["weight"],
            self.activation,
            pg["bias"],
            pu["bias"],
            pd["bias"],
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def dense_act(layer: nn.Module, x: Tensor, activation: str, dropout_p: float = 0.0) -> Tensor:
    """``dropout(act(layer(x)))``: one fused GEMM for a plain ``nn.Linear``
    (:func:`fastlm.ops.linear_act`); otherwise the layer's own forward (a quantized one, say)
    then the fused bias-free activation and dropout."""
    if type(layer) is nn.Linear:  # parameters read from their table, as in FusedMLP.forward
        params = layer._parameters
        return linear_act(x, params["weight"], params["bias"], activation, dropout_p)
    return bias_act(layer(x), None, activation, dropout_p)
