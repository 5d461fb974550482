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

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.ops.activation import check_dropout, seeded_dropout
from fastlm.ops.autocast import autocast_policy
from fastlm.quant.formats import NF4_CODE, QuantizedWeight, dequantize_weight

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _dense(weight: Tensor | QuantizedWeight, dtype: torch.dtype) -> Tensor:
    return dequantize_weight(weight, dtype) if isinstance(weight, QuantizedWeight) else weight


def lora_linear_ref(x: Tensor, weight: Tensor | QuantizedWeight, bias: Tensor | None,
                    lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:  # fmt: skip
    """The unfused formula (no dropout), a quantized weight dequantized in x's dtype."""
    base = F.linear(x, _dense(weight, x.dtype), bias)
    return base + scale * F.linear(F.linear(x, lora_a), lora_b)


@autocast_policy(lower_precision=True)
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
    (r, K); lora_b (N, r). Gradients reach x, lora_a and lora_b (not weight or bias).
    """
    quantized = isinstance(weight, QuantizedWeight)
    n, k = weight.shape
    if x.shape[-1] != k or lora_a.shape[1] != k or lora_b.shape[0] != n:
        raise ValueError(
            f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
            f", lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"lora_a has rank {lora_a.shape[0]}, lora_b {lora_b.shape[1]}")
    seed = check_dropout(dropout_p, seed)

    def triton_error():
        dtypes = {x.dtype, lora_a.dtype, lora_b.dtype} | (
            {weight.dtype} if not quantized else set()
        )
        if len(dtypes) > 1 or x.dtype not in _KERNEL_DTYPES:
            return f"the fused kernel takes one fp16/bf16 dtype, got {sorted(map(str, dtypes))}"
        return None

    name = backend.select("lora_linear", x.device, {"triton": triton_error,
                                                    "torch": lambda: None})  # fmt: skip
    if name == "torch":
        dropped = seeded_dropout(x, dropout_p, seed)
        base = F.linear(x, _dense(weight, x.dtype), bias)
        return base + scale * F.linear(F.linear(dropped, lora_a), lora_b)
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p),
                             seed)  # fmt: skip


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        t = F.linear(seeded_dropout(x2, dropout_p, seed), lora_a).contiguous()
        lora = (t, lora_b.contiguous(), scale)
        if isinstance(weight, QuantizedWeight):
            from fastlm.kernels.quant import quant_matmul_fwd

            code = (torch.tensor(NF4_CODE, device=x.device) if weight.scheme == "nf4"
                    else None)  # fmt: skip
            y = quant_matmul_fwd(x2, weight.qweight, weight.scales, weight.zeros, weight.scales2,
                                 weight.scales_mean, code, bias, weight.bits,
                                 weight.scheme == "nf4",
                                 weight.group_size if weight.bits == 4 else 0, weight.shape[0],
                                 lora=lora)  # fmt: skip
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
