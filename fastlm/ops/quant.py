"""Quantized matmuls: weight-only (int8, int4, NF4) and W8A8, with backend choice.

``quant_matmul(x, qw, bias)`` is ``F.linear(x, dequantize_weight(qw), bias)`` computed
without the float weight: the Triton kernel (fp16/bf16 activations) unpacks and scales the
codes in registers; the CUDA C++ GEMV serves int4/int8 at M <= 8 when forced (opt-in until a
GPU run verifies it); the ``torch`` backend (the CPU path) dequantizes and calls
``F.linear``. Gradients flow to ``x`` and ``bias`` (the quantized weight is frozen, as in
QLoRA); the backward multiplies by the dequantized weight.

``w8a8_matmul(x, qw, bias)`` quantizes x per token to int8 and multiplies int8 by int8
(int32 accumulation): inference only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastlm import backend
from fastlm.backend import forced_backend
from fastlm.ops._common import HALF_DTYPES, EagerOp, any_autocast, supports
from fastlm.ops.activation import kernels, matrix_rows
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import describe
from fastlm.ops.quant_formats import QuantizedWeight, dequantize_weight, nf4_code

GEMV_MAX_M = 8  # rows the CUDA C++ GEMV serves
# Inputs per output up to which a sum of int8 x int8 products (each at most 127 * 127 in
# magnitude) fits in int32.
_INT32_EXACT_K = (2**31 - 1) // (127 * 127)


def quant_matmul_ref(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """Dequantize in x's dtype, then ``F.linear`` (the torch backend; run in float64 by the
    tests as the oracle)."""
    return linear(x, dequantize_weight(qw, x.dtype), bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` in x's dtype, with a bias of any float dtype: a quantized layer keeps its
    bias in the dtype it was trained in (``QuantLinear``), which ``F.linear`` refuses."""
    if bias is None or bias.dtype is x.dtype:
        return _linear(x, weight, bias)
    return (_linear(x, weight) + bias).to(x.dtype)


def quantize_rows_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (token) symmetric int8: ``x ~ xq * xs[:, None]``, ``xs = absmax / 127``."""
    xs = x.float().abs().amax(dim=-1).clamp_min(1e-12) / 127
    return torch.round(x.float() / xs[:, None]).to(torch.int8), xs


def _check(x: Tensor, qw: QuantizedWeight, bias: Tensor | None) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a fastlm.quant.QuantizedWeight, got {type(qw).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {describe(x)}")
    n, k = qw.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be (..., {k}), got shape {tuple(x.shape)}")
    x_cpu = x.is_cpu
    if not (x_cpu and qw.qweight.is_cpu) and qw.qweight.device != x.device:
        raise ValueError(f"qw is on {qw.qweight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {describe(bias)}")
        if bias.shape != (n,) or not (x_cpu and bias.is_cpu) and bias.device != x.device:
            raise ValueError(
                f"bias must be ({n},) on {x.device}, got {tuple(bias.shape)} on {bias.device}"
            )


def _support(x: Tensor, qw: QuantizedWeight):
    rows = math.prod(x.shape[:-1])

    def triton_error():
        if x.dtype not in HALF_DTYPES:
            return f"the Triton kernels take fp16/bf16 activations, got {x.dtype}"
        return None

    def cuda_error():
        if x.dtype not in HALF_DTYPES:
            return f"the CUDA GEMV takes fp16/bf16 activations, got {x.dtype}"
        if qw.scheme != "int":
            return "the CUDA GEMV serves int4/int8, not nf4"
        if rows > GEMV_MAX_M:
            return f"the CUDA GEMV serves M <= {GEMV_MAX_M} rows, got {rows}"
        return None

    return supports(triton_error, cuda_error)


def quant_matmul(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` for a quantized W (N, K).

    x: (..., K), fp16/bf16 on the GPU kernels (fp32 runs the torch path); bias (N,) of any
    float dtype, or None. Returns (..., N) in x's dtype, accumulated in fp32.
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _quant_matmul_under_autocast(x, qw, bias)
    return _quant_matmul_call(x, qw, bias)


def _quant_matmul_call(x: Tensor, qw: QuantizedWeight, bias: Tensor | None) -> Tensor:
    _check(x, qw, bias)
    if (x.is_cpu and forced_backend() is None) or (
        name := backend.select("quant_matmul", x, lambda: _support(x, qw))
    ) == "torch":
        w = dequantize_weight(qw, x.dtype)
        if bias is None or bias.dtype is x.dtype:  # linear(), inline
            return _linear(x, w, bias)
        return linear(x, w, bias)
    n, _ = qw.shape
    return quant_matmul_op(
        x,
        qw.qweight,
        qw.scales,
        qw.zeros,
        qw.scales2,
        qw.scales_mean,
        bias,
        qw.scheme,
        qw.bits,
        qw.group_size,
        qw.symmetric,
        n,
        name,
    )


_quant_matmul_under_autocast = autocast_policy(lower_precision=True)(_quant_matmul_call)
_linear = torch._C._nn.linear  # bound once: each attribute walk costs on every call


@autocast_policy(lower_precision=True)
def w8a8_matmul(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` with x quantized per token to int8 and W int8 per channel, on
    int8 tensor cores (int32 accumulation). x: (..., K); returns (..., N) in x's dtype.
    Inference only (no gradient)."""
    _check(x, qw, bias)
    if qw.bits != 8:
        raise ValueError(f"w8a8_matmul needs an 8-bit weight, got bits={qw.bits}")
    name = backend.select("w8a8_matmul", x, lambda: supports(triton=_served))
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    n = qw.shape[0]
    if name == "torch":
        xq, xs = quantize_rows_ref(x2)
        if x2.is_cpu and qw.shape[1] <= _INT32_EXACT_K:
            # PyTorch's int8 GEMM accumulates in int32: the same exact sums as float64 (both
            # hold every one), without a float64 copy of the weight, at a twentieth the time.
            acc = torch._int_mm(xq, qw.qweight.T).double()
        else:
            # int8 x int8 sums stay below 2**53: exact in float64.
            acc = xq.double() @ qw.qweight.double().T
        # In place on the fresh product, in the formula's order: the same bits.
        y = acc.mul_(xs.double()[:, None]).mul_(qw.scales.double()[None, :])
        if bias is not None:
            y = y.add_(bias.double())
        return y.to(x.dtype).view(*x.shape[:-1], n)
    from fastlm.kernels.quant import quantize_rows, w8a8_matmul_fwd

    xq, xs = quantize_rows(x2.contiguous())
    y = w8a8_matmul_fwd(xq, xs, qw.qweight, qw.scales, bias, x.dtype)
    return y.view(*x.shape[:-1], n)


def _weight(qweight, scales, zeros, scales2, scales_mean, scheme, bits, group, symmetric, n):
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    return QuantizedWeight(
        scheme, bits, (n, k), group, symmetric, qweight, scales, zeros, scales2, scales_mean
    )


def _served() -> None:
    return None


def _quant_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    scales2: Tensor | None,
    scales_mean: Tensor | None,
    bias: Tensor | None,
    scheme: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    n: int,
    name: str,
) -> Tensor:
    x2 = matrix_rows(x)
    if name == "cuda":
        x2 = x2.contiguous()
        y = torch.ops.fastlm_C.quant_gemv(
            x2, qweight, scales, zeros, bits, group_size if bits == 4 else 0
        )
        if bias is not None:
            y = y + bias
    else:
        code = nf4_code(x.device) if scheme == "nf4" else None
        y = kernels("quant").quant_matmul_fwd(
            x2,
            qweight,
            scales,
            zeros,
            scales2,
            scales_mean,
            code,
            bias,
            bits,
            scheme == "nf4",
            group_size if bits == 4 else 0,
            n,
        )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


_quant_matmul_op = torch.library.custom_op("fastlm::quant_matmul", _quant_matmul, mutates_args=())


@_quant_matmul_op.register_fake
def _(
    x,
    qweight,
    scales,
    zeros,
    scales2,
    scales_mean,
    bias,
    scheme,
    bits,
    group_size,
    symmetric,
    n,
    name,
):
    return x.new_empty((*x.shape[:-1], n))


def _setup(ctx, inputs, output):
    x, qweight, scales, zeros, scales2, scales_mean, bias, *options = inputs
    ctx.save_for_backward(qweight, scales, zeros, scales2, scales_mean)
    ctx.options = options
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    qweight, scales, zeros, scales2, scales_mean = ctx.saved_tensors
    scheme, bits, group, symmetric, n, _ = ctx.options
    qw = _weight(qweight, scales, zeros, scales2, scales_mean, scheme, bits, group, symmetric, n)
    dx = grad @ dequantize_weight(qw, grad.dtype)
    db = grad.reshape(-1, n).sum(0, dtype=torch.float32).to(grad.dtype) if ctx.has_bias else None
    return dx, None, None, None, None, None, db, None, None, None, None, None, None


# The Triton and CUDA backends' entrance (the custom op under torch.compile, subclasses and
# modes).
quant_matmul_op = EagerOp(_quant_matmul_op, _quant_matmul, _setup, _backward)

backend.register_op("quant_matmul", ("cuda", "triton", "torch"))
backend.register_op("w8a8_matmul", ("triton", "torch"))
