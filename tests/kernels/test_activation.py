"""Fused bias + activation (+ dropout) kernels against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from fastlm.kernels import activation as kernels

from fastlm.ops.activation import ACTIVATIONS, bias_act_ref
from fastlm.testing import assert_policy, poisoned_outputs, summand_scale

_C = (2 / torch.pi) ** 0.5
# |terms| each activation's derivative is a sum of (they cancel for negative inputs), fp64:
# the dx floor is one ulp of dy times these, not of the (smaller) result.
_DERIVATIVE_TERMS = {
    "identity": lambda x: torch.ones_like(x),
    "relu": lambda x: (x > 0).double(),
    "gelu": lambda x: (
        0.5 * (1 + torch.erf(x / 2**0.5))
        + (x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5).abs()
    ),
    "gelu_tanh": lambda x: (
        (s := torch.sigmoid(2 * _C * (x + 0.044715 * x**3)))
        + (2 * x * s * (1 - s) * _C * (1 + 3 * 0.044715 * x * x)).abs()
    ),
    "silu": lambda x: (s := torch.sigmoid(x)) + (x * s * (1 - s)).abs(),
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 150), (130, 257)])
def test_bias_act_matches_reference(device_backend, activation, dtype, shape):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("bias_act has no CUDA C++ kernel")
    x = torch.randn(shape, dtype=dtype, device=device)
    bias = torch.randn(shape[1], dtype=dtype, device=device)
    dy = torch.randn(shape, dtype=dtype, device=device)
    with poisoned_outputs():
        y = kernels.bias_act_fwd(x, bias, activation, 0.0, 0)
        dx, db = kernels.bias_act_bwd(dy, x, bias, activation, 0.0, 0)

    def run(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, bias)]
        out = bias_act_ref(*leaves, activation)
        return out, torch.autograd.grad((out * dy.to(dt)).sum(), leaves)

    ref_y, (ref_dx, ref_db) = run(torch.float64)
    base_y, (base_dx, base_db) = run(dtype)
    assert_policy(y, ref_y, base_y, "y")
    pre = x.double() + bias.double()
    # The derivative chains fp32 transcendentals (erf, exp, sigmoid), each good to ~2 ulps
    # (CUDA's documented bounds), so its floor is a few ulps of its terms, not one.
    dx_terms = 4 * dy.double().abs() * _DERIVATIVE_TERMS[activation](pre)
    assert_policy(dx, ref_dx, base_dx, "dx", scale=dx_terms.max().item())
    assert db.dtype == torch.float32
    assert_policy(db.to(dtype), ref_db, base_db, "dbias", scale=summand_scale(dx_terms, 0))


def test_dropout_mask_is_seeded_kept_at_rate_and_reused_by_backward(device_backend):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("bias_act has no CUDA C++ kernel")
    ones = torch.ones(64, 256, device=device)
    keep = kernels.bias_act_fwd(ones, None, "identity", 0.3, 5) > 0
    again = kernels.bias_act_fwd(ones, None, "identity", 0.3, 5) > 0
    other = kernels.bias_act_fwd(ones, None, "identity", 0.3, 6) > 0
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    n = keep.numel()
    assert abs(keep.float().mean().item() - 0.7) < 5 * (0.21 / n) ** 0.5
    dx, _ = kernels.bias_act_bwd(ones, ones, None, "identity", 0.3, 5)
    assert torch.equal(dx > 0, keep)
    torch.testing.assert_close(dx[keep], torch.full_like(dx[keep], 1 / 0.7))
