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
        dx, db, y_again = kernels.bias_act_bwd(dy, x, bias, activation, 0.0, 0, True)

    def run(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, bias)]
        out = bias_act_ref(*leaves, activation)
        return out, torch.autograd.grad((out * dy.to(dt)).sum(), leaves)

    ref_y, (ref_dx, ref_db) = run(torch.float64)
    base_y, (base_dx, base_db) = run(dtype)
    # fp32 erf/exp/sigmoid are good to ~2 ulps (CUDA's documented bounds; NumPy's under the
    # interpreter), then a product rounds: a few ulps of floor, not one.
    assert_policy(y, ref_y, base_y, "y", scale=4 * ref_y.abs().max().item())
    assert torch.equal(y_again, y), "the backward's recomputed output differs from the forward's"
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
    dx, _, y = kernels.bias_act_bwd(ones, ones, None, "identity", 0.3, 5, recompute=True)
    assert torch.equal(dx > 0, keep)
    assert torch.equal(y, kernels.bias_act_fwd(ones, None, "identity", 0.3, 5))
    torch.testing.assert_close(dx[keep], torch.full_like(dx[keep], 1 / 0.7))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_act_backward_matches_reference(device_backend, activation, dtype, with_bias):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("gated_act_bwd has no CUDA C++ kernel")
    m, n = 45, 131
    gate, up, dy = (torch.randn(m, n, dtype=dtype, device=device) for _ in range(3))
    biases = [torch.randn(n, dtype=dtype, device=device) for _ in range(2)] if with_bias else []
    with poisoned_outputs():
        dgate, dup, dbg, dbu, y = kernels.gated_act_bwd(
            dy, gate, up, *(biases or [None, None]), activation, recompute=True
        )

    def run(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (gate, up, *biases)]
        g, u = leaves[0], leaves[1]
        if with_bias:
            g, u = g + leaves[2], u + leaves[3]
        out = bias_act_ref(g, None, activation) * u
        return out, torch.autograd.grad((out * dy.to(dt)).sum(), leaves)

    ref_y, ref_grads = run(torch.float64)
    base_y, base_grads = run(dtype)
    assert_policy(y, ref_y, base_y, "y", scale=4 * ref_y.abs().max().item())  # as above
    g = gate.double() + (biases[0].double() if with_bias else 0)
    u = up.double() + (biases[1].double() if with_bias else 0)
    dgate_terms = 4 * (dy.double() * u).abs() * _DERIVATIVE_TERMS[activation](g)
    dup_terms = 4 * (dy.double() * bias_act_ref(g, None, activation)).abs()
    got = [dgate, dup] + ([dbg.to(dtype), dbu.to(dtype)] if with_bias else [])
    scales = [
        dgate_terms.max().item(),
        dup_terms.max().item(),
        summand_scale(dgate_terms, 0),
        summand_scale(dup_terms, 0),
    ]
    names = ["dgate", "dup", "dbias_gate", "dbias_up"]
    for name, a, r, b, scale in zip(names, got, ref_grads, base_grads, scales, strict=False):
        assert_policy(a, r, b, name, scale=scale)
    assert (dbg is None) == (dbu is None) == (not with_bias)
