"""GEMM-with-epilogue kernels (linear_act, gated_linear) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastlm.kernels import activation as act_kernels
from fastlm.kernels import mlp as kernels

from fastlm.ops.activation import ACTIVATIONS, bias_act_ref
from fastlm.testing import assert_policy, poisoned_outputs

DTYPES = [torch.float16, torch.bfloat16]
# (M, N, K): single elements, primes, and sizes straddling the interpreter's 32-wide tiles.
SHAPES = [(1, 1, 1), (37, 53, 71), (65, 130, 33), (3, 257, 96)]


def _skip_unless_triton(backend):
    if backend != "triton":
        pytest.skip("the fused GEMMs have no CUDA C++ kernel")


def _operands(m, n, k, dtype, device, count=1):
    x = torch.randn(m, k, dtype=dtype, device=device)
    # Weights scaled as nn.Linear initializes them, so outputs stay O(1) at every K.
    weights = [torch.randn(n, k, dtype=dtype, device=device) / k**0.5 for _ in range(count)]
    return x, weights


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_act_matches_reference(device_backend, activation, dtype, shape, with_bias):
    device, backend = device_backend
    _skip_unless_triton(backend)
    m, n, k = shape
    x, (w,) = _operands(m, n, k, dtype, device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    with poisoned_outputs():
        y, pre = kernels.linear_act_fwd(x, w, bias, activation, save_pre=True)

    def run(dt):
        pre = F.linear(x.to(dt), w.to(dt), None if bias is None else bias.to(dt))
        return pre, bias_act_ref(pre, None, activation)

    ref_pre, ref_y = run(torch.float64)
    base_pre, base_y = run(dtype)
    assert y.dtype == dtype and pre.dtype == dtype
    assert_policy(y, ref_y, base_y, "y")
    assert_policy(pre, ref_pre, base_pre, "pre-activation")


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gated_linear_matches_reference(device_backend, activation, dtype, shape, with_bias):
    device, backend = device_backend
    _skip_unless_triton(backend)
    m, n, k = shape
    x, (wg, wu) = _operands(m, n, k, dtype, device, count=2)
    biases = [torch.randn(n, dtype=dtype, device=device) for _ in range(2)] if with_bias else []
    with poisoned_outputs():
        y, gate, up = kernels.gated_linear_fwd(
            x, wg, wu, *(biases or [None, None]), activation, save_pre=True
        )

    def run(dt):
        bg, bu = [b.to(dt) for b in biases] or [None, None]
        xd = x.to(dt)
        gate, up = F.linear(xd, wg.to(dt), bg), F.linear(xd, wu.to(dt), bu)
        return bias_act_ref(gate, None, activation) * up, gate, up

    ref, base = run(torch.float64), run(dtype)
    for name, got, r, b in zip(("y", "gate", "up"), (y, gate, up), ref, base, strict=True):
        assert_policy(got, r, b, name)


def test_outputs_are_not_saved_unless_asked(device_backend):
    device, backend = device_backend
    _skip_unless_triton(backend)
    x, (wg, wu) = _operands(5, 7, 16, torch.bfloat16, device, count=2)
    assert kernels.linear_act_fwd(x, wg, None, "relu")[1] is None
    assert kernels.gated_linear_fwd(x, wg, wu, None, None, "silu")[1:] == (None, None)


def test_strided_rows_and_empty_inputs(device_backend):
    device, backend = device_backend
    _skip_unless_triton(backend)
    wide = torch.randn(9, 80, dtype=torch.bfloat16, device=device)
    x = wide[:, 3:51]  # rows 80 apart, unit stride along K
    w = torch.randn(20, 48, dtype=torch.bfloat16, device=device)
    y, _ = kernels.linear_act_fwd(x, w, None, "identity")
    assert_policy(y, F.linear(x.double(), w.double()), F.linear(x.contiguous(), w), "y")
    y, pre = kernels.linear_act_fwd(x[:0], w, None, "gelu", save_pre=True)
    assert y.shape == (0, 20) and pre.shape == (0, 20)


def test_dropout_in_the_epilogue_uses_the_elementwise_kernels_mask(device_backend):
    """The GEMM's dropout mask is the one ``bias_act`` draws for the same seed and (row,
    column): the backward regenerates it with the elementwise kernel."""
    device, backend = device_backend
    _skip_unless_triton(backend)
    m, n, k, p = 70, 90, 40, 0.4
    x, (w,) = _operands(m, n, k, torch.float16, device)
    bias = torch.randn(n, dtype=torch.float16, device=device)
    y, pre = kernels.linear_act_fwd(x, w, bias, "silu", p, seed=11, save_pre=True)
    no_drop, _ = kernels.linear_act_fwd(x, w, bias, "silu")
    ones = torch.ones(m, n, dtype=torch.float16, device=device)
    keep = act_kernels.bias_act_fwd(ones, None, "identity", p, 11) > 0
    assert 0.45 < keep.float().mean().item() < 0.75
    assert torch.equal(y == 0, ~keep | (no_drop == 0))
    # The float64 reference with this mask, and PyTorch's own fp16 result with it.
    ref = F.silu(F.linear(x.double(), w.double(), bias.double())) * keep / (1 - p)
    base = F.silu(F.linear(x, w, bias)) * keep / (1 - p)
    assert_policy(y, ref, base, "y")
    # The backward's recomputation of y from the saved pre-activation: as accurate.
    _, _, again = act_kernels.bias_act_bwd(ones, pre, None, "silu", p, 11, recompute=True)
    assert_policy(again, ref, base, "y recomputed")
