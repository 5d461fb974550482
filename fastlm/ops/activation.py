"""Fused bias + activation (+ dropout): reference, custom op with autograd, dispatch.

For MLPs whose GEMMs stay in cuBLAS: ``dropout(act(x + bias))`` in one pass instead of three
elementwise kernels, and a backward that recomputes the activation's derivative from the
saved input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")
_TORCH_ACT = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bias_act_ref(x: Tensor, bias: Tensor | None = None, activation: str = "gelu") -> Tensor:
    """``act(x + bias)``, the plain way (no dropout)."""
    return _TORCH_ACT[activation](x if bias is None else x + bias)


def bias_act(
    x: Tensor,
    bias: Tensor | None = None,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``dropout(act(x + bias))`` over the last dim of ``x`` (any leading dims).

    activation: one of ``identity, relu, gelu`` (erf), ``gelu_tanh``, ``silu``. ``bias``:
    (N,) matching the last dim. ``dropout_p`` drops with a mask fixed by ``seed`` (None: drawn
    from torch's generator); the backward reuses the same mask. Math in fp32.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None:
        if tuple(bias.shape) != (x.shape[-1],):
            raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    name = backend.select("bias_act", x.device, _support(x, bias))
    if name == "torch":
        y = bias_act_ref(x, bias, activation)
        if dropout_p == 0:
            return y
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return F.dropout(y, dropout_p)
    return torch.ops.fastlm.bias_act(x, bias, activation, float(dropout_p), seed or 0)


def _support(x, bias):
    def triton_error():
        for arg, t in (("x", x), ("bias", bias)):
            if t is not None and t.dtype not in _KERNEL_DTYPES:
                return f"{arg} dtype {t.dtype} is not one of {_KERNEL_DTYPES}"
        return None

    return {"triton": triton_error, "torch": lambda: None}


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("fastlm::bias_act", mutates_args=())
def _bias_act_op(
    x: Tensor, bias: Tensor | None, activation: str, dropout_p: float, seed: int
) -> Tensor:
    from fastlm.kernels.activation import bias_act_fwd

    bias_ = None if bias is None else bias.contiguous()
    return bias_act_fwd(_rows(x), bias_, activation, dropout_p, seed).view(x.shape)


@_bias_act_op.register_fake
def _(x, bias, activation, dropout_p, seed):
    return torch.empty_like(x)


@torch.library.custom_op("fastlm::bias_act_bwd", mutates_args=())
def _bias_act_bwd_op(
    grad: Tensor, x: Tensor, bias: Tensor | None, activation: str, dropout_p: float, seed: int
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels.activation import bias_act_bwd

    bias_ = None if bias is None else bias.contiguous()
    dx, db, _ = bias_act_bwd(_rows(grad), _rows(x), bias_, activation, dropout_p, seed)
    return dx.view(x.shape), x.new_empty(0, dtype=torch.float32) if db is None else db


@_bias_act_bwd_op.register_fake
def _(grad, x, bias, activation, dropout_p, seed):
    n = 0 if bias is None else bias.shape[0]
    return torch.empty_like(x), x.new_empty(n, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, bias, activation, dropout_p, seed = inputs
    ctx.save_for_backward(x, bias)
    ctx.options = (activation, dropout_p, seed)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, db = torch.ops.fastlm.bias_act_bwd(grad, x, bias, *ctx.options)
    return dx, None if bias is None else db.to(bias.dtype), None, None, None


torch.library.register_autograd("fastlm::bias_act", _backward, setup_context=_setup_context)
backend.register_op("bias_act", ("triton", "torch"))
