"""LoRA-fused linear: ``y = x @ W.T + b + scale * dropout(x) @ A.T @ B.T`` in one GEMM,
for a float W or a quantized one (QLoRA: the codes dequantized in registers).

The rank-r intermediate ``t = dropout(x) @ A.T`` (M, r) is computed first (a skinny GEMM);
the base GEMM then adds ``scale * t @ B.T`` to its accumulator before writing y
(:func:`fastlm.kernels.mlp.linear_act_fwd` with ``lora``), so y is written once. The
backward keeps only x and t: ``dB = scale * dy.T @ t``, ``u = scale * dy @ B``,
``dA = u.T @ dropout(x)``, ``dx = dy @ W + dropout'(u @ A)`` (a quantized W dequantized for
that product); the base stays frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.backend import forced_backend
from fastlm.ops._common import (
    HALF_DTYPES,
    any_autocast,
    is_dynamo_compiling,
    remember,
    signature_memo,
    supports,
)
from fastlm.ops.activation import check_dropout, seeded_dropout
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_real, describe
from fastlm.ops.quant import linear
from fastlm.ops.quant_formats import QuantizedWeight, dequantize_weight, nf4_code


def _dense(weight: Tensor | QuantizedWeight, dtype: torch.dtype) -> Tensor:
    return dequantize_weight(weight, dtype) if isinstance(weight, QuantizedWeight) else weight


def lora_linear_ref(
    x: Tensor,
    weight: Tensor | QuantizedWeight,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
) -> Tensor:
    """The unfused formula (no dropout), a quantized weight dequantized in x's dtype."""
    base = linear(x, _dense(weight, x.dtype), bias)
    return base + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_linear(
    x: Tensor,
    weight: Tensor | QuantizedWeight,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``x @ weight.T + bias + scale * dropout(x) @ lora_a.T @ lora_b.T``.

    x: (..., K); weight (N, K) frozen, a tensor or a ``QuantizedWeight`` (QLoRA); lora_a
    (r, K); lora_b (N, r), all in x's dtype; bias (N,) of any float dtype. Returns (..., N)
    in x's dtype. Gradients reach x, lora_a and lora_b (not weight or bias).
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _lora_linear_under_autocast(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    return _lora_linear_call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)


def _lora_linear_call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    try:  # the signature (see fastlm.ops._common.remember)
        # A quantized weight's device and dtype are its codes'.
        w = weight.qweight if type(weight) is QuantizedWeight else weight
        key = (
            None
            if is_dynamo_compiling()
            else (
                type(x),
                x.shape[-1],
                x.dtype,
                (x_cpu := x.is_cpu) or x.device,
                type(weight),
                weight.shape,
                w.dtype,
                w.is_cpu or w.device,
                bias is None or (type(bias), bias.shape, bias.dtype, bias.is_cpu or bias.device),
                type(lora_a),
                lora_a.shape,
                lora_a.dtype,
                lora_a.is_cpu or lora_a.device,
                type(lora_b),
                lora_b.shape,
                lora_b.dtype,
                lora_b.is_cpu or lora_b.device,
            )
        )
        # Whether the bias is absent or in x's dtype (F.linear takes it as it is).
        plain_bias = None if key is None else _LORA_LINEAR_PASSED.get(key)
    except Exception:  # not a tensor, a 0-d x: the check words it
        key, plain_bias = None, None
    if plain_bias is None:
        _check(x, weight, bias, lora_a, lora_b)
        plain_bias = bias is None or bias.dtype is x.dtype
        if key is not None:
            remember(_LORA_LINEAR_PASSED, key, plain_bias)
        x_cpu = x.is_cpu
    # A value, checked every call (NaN fails the comparison).
    if type(scale) is not float or not -_INF < scale < _INF:
        scale = check_real("scale", scale)
    if type(dropout_p) is not float or dropout_p != 0.0 or seed is not None:
        seed = check_dropout(dropout_p, seed)
    else:
        seed = 0
    if (x_cpu and forced_backend() is None) or backend.select(
        "lora_linear", x, lambda: supports(lambda: _triton_error(x))
    ) == "torch":
        dropped = seeded_dropout(x, dropout_p, seed) if dropout_p else x
        if type(weight) is not Tensor and isinstance(weight, QuantizedWeight):
            weight = dequantize_weight(weight, x.dtype)
        # The bias may keep its own float dtype (see fastlm.ops.quant.linear).
        base = _linear(x, weight, bias) if plain_bias else linear(x, weight, bias)
        update = _linear(_linear(dropped, lora_a), lora_b)
        # base + scale * update, in place on the two fresh GEMM outputs: the same operations
        # (the same bits) without two more (M, N) tensors. Autograd allows it: a GEMM's
        # backward reads its inputs, never its output, and a sum's nothing.
        return base.add_(update.mul_(scale))
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scale, float(dropout_p), seed)


_lora_linear_under_autocast = autocast_policy(lower_precision=True)(_lora_linear_call)
_LORA_LINEAR_PASSED = signature_memo()
_linear = torch._C._nn.linear  # bound once: each attribute walk costs on every call
_INF = math.inf


def _triton_error(x: Tensor) -> str | None:
    if x.dtype not in HALF_DTYPES:
        return f"the fused kernel takes fp16/bf16, got {x.dtype}"
    return None


def _check(x, weight, bias, lora_a, lora_b) -> None:
    """The metadata part of :func:`lora_linear`'s contract: one float dtype and device
    throughout, shapes that chain (the scale is checked per call)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {describe(x)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (features last)")
    x_cpu, dtype = x.is_cpu, x.dtype
    quantized = isinstance(weight, QuantizedWeight)
    if quantized:
        if not (x_cpu and weight.qweight.is_cpu) and weight.qweight.device != x.device:
            raise ValueError(f"weight is on {weight.qweight.device} but x is on {x.device}")
    elif not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D tensor or a QuantizedWeight, got {describe(weight)}")
    # The bias may keep its own float dtype (QuantLinear's does); the rest is x's.
    if bias is not None and (not isinstance(bias, Tensor) or not bias.is_floating_point()):
        raise TypeError(f"bias must be a floating-point tensor, got {describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is None or (quantized and t is weight):
            continue
        if name != "bias" and (not isinstance(t, Tensor) or t.dtype is not dtype):
            raise TypeError(f"{name} must be a tensor of x's dtype {x.dtype}, got {describe(t)}")
        if not (x_cpu and t.is_cpu) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    # Each shape read once (a read is a C call).
    n, k = weight.shape
    a_shape, b_shape = lora_a.shape, lora_b.shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise ValueError(
            f"lora_a and lora_b must be 2-D (r, K) and (N, r), got "
            f"{tuple(a_shape)} and {tuple(b_shape)}"
        )
    if x.shape[-1] != k or a_shape[1] != k or b_shape[0] != n:
        raise ValueError(
            f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
            f", lora_a {tuple(a_shape)}, lora_b {tuple(b_shape)}"
        )
    if a_shape[0] != b_shape[1]:
        raise ValueError(f"lora_a has rank {a_shape[0]}, lora_b {b_shape[1]}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
        t = F.linear(seeded_dropout(x2, dropout_p, seed), lora_a).contiguous()
        lora = (t, lora_b.contiguous(), scale)
        if isinstance(weight, QuantizedWeight):
            from fastlm.kernels.quant import quant_matmul_fwd

            code = nf4_code(x.device) if weight.scheme == "nf4" else None
            y = quant_matmul_fwd(
                x2,
                weight.qweight,
                weight.scales,
                weight.zeros,
                weight.scales2,
                weight.scales_mean,
                code,
                bias,
                weight.bits,
                weight.scheme == "nf4",
                weight.group_size if weight.bits == 4 else 0,
                weight.shape[0],
                lora=lora,
            )
            ctx.weight = weight
            ctx.save_for_backward(x2, t, lora_a, lora_b)
        else:
            from fastlm.kernels.mlp import linear_act_fwd

            y, _ = linear_act_fwd(x2, weight.contiguous(), bias, "identity", lora=lora)
            ctx.weight = None
            ctx.save_for_backward(x2, t, lora_a, lora_b, weight)
        ctx.options = (scale, dropout_p, seed, x.shape)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, t, lora_a, lora_b, *dense = ctx.saved_tensors
        weight = dense[0] if dense else dequantize_weight(ctx.weight, dy.dtype)
        scale, dropout_p, seed, shape = ctx.options
        dy2 = dy.reshape(-1, dy.shape[-1])
        d_b = scale * (dy2.T @ t)
        u = scale * (dy2 @ lora_b)
        dropped = seeded_dropout(x2, dropout_p, seed)
        d_a = u.T @ dropped
        dx = dy2 @ weight + seeded_dropout(u @ lora_a, dropout_p, seed)
        return dx.view(shape), None, None, d_a, d_b, None, None, None


backend.register_op("lora_linear", ("triton", "torch"))
