"""Ops inside ``torch.autocast``: GEMM-like ops compute in the autocast dtype, the others on
their inputs as given, identically on both backends, and fp32 parameters get fp32 grads."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm import ops

BACKENDS = ["torch", "triton"]


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


# (name, make args, op, casts to the autocast dtype)
CASES = [
    (
        "linear_act",
        lambda: (_leaf(5, 24), _leaf(16, 24), _leaf(16)),
        lambda x, w, b: ops.linear_act(x, w, b, "gelu"),
        True,
    ),
    (
        "gated_mlp",
        lambda: (_leaf(5, 24), _leaf(16, 24), _leaf(16, 24), _leaf(24, 16)),
        lambda x, g, u, d: ops.gated_mlp(x, g, u, d),
        True,
    ),
    (
        "linear_cross_entropy",
        lambda: (_leaf(6, 24), _leaf(40, 24), torch.randint(0, 40, (6,))),
        lambda h, w, t: ops.linear_cross_entropy(h, w, t, out_dtype=torch.float32),
        True,
    ),
    (
        "flash_attention",
        lambda: (_leaf(1, 7, 2, 16), _leaf(1, 7, 2, 16), _leaf(1, 7, 2, 16)),
        lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
        True,
    ),
    (
        "layer_norm",
        lambda: (_leaf(5, 24, dtype=torch.bfloat16), _leaf(24), _leaf(24)),
        lambda x, w, b: ops.layer_norm(x, 24, w, b),
        False,
    ),
    (
        "bias_act",
        lambda: (_leaf(5, 24, dtype=torch.bfloat16), _leaf(24)),
        lambda x, b: ops.bias_act(x, b, "silu"),
        False,
    ),
]


def _cast_expected(args, casts):
    if not casts:
        return args
    return tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_autocast_matches_explicit_casts(case, backend):
    """Under autocast the op returns exactly what it returns outside autocast on the inputs
    autocast's policy gives it, and the gradients reach the fp32 leaves in fp32."""
    _, make, op, casts = case
    args = make()
    with fastlm.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = op(*args)
        expected = op(*_cast_expected(args, casts))
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)
    out.float().sum().backward()
    for a in args:
        if a.is_floating_point():
            assert a.grad is not None and a.grad.dtype == a.dtype


def test_autocast_casts_gemm_inputs():
    """The GEMM-like op really computes in bf16 under autocast (its fp32 result would differ)."""
    x, w = torch.randn(8, 64), torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_act(x, w, None, "identity")
    assert y.dtype == torch.bfloat16
    assert not torch.equal(y.float(), ops.linear_act(x, w, None, "identity"))


def test_autocast_leaves_float64_alone():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_act(x, w, None, "relu")
    assert y.dtype == torch.float64
