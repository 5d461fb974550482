"""fastlm.ops.bias_act: both backends, autograd, compile, bad input."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops.activation import ACTIVATIONS
from fastlm.testing import assert_policy, summand_scale


@pytest.mark.parametrize("be", ["torch", "triton"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_forward_and_grads(be, activation):
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
    with fastlm.use_backend(be):
        y = ops.bias_act(x, bias, activation)
        grads = torch.autograd.grad(y.float().sum(), (x, bias))

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, bias)]
        out = ops.bias_act_ref(*leaves, activation)
        return out, torch.autograd.grad(out.sum(), leaves)

    (ref, ref_grads), (base, base_grads) = reference(torch.float64), reference(x.dtype)
    assert_policy(y, ref, base, "y")
    # dbias adds up dx over the rows: one ulp of the sum of their magnitudes.
    scales = (None, summand_scale(ref_grads[0], (0, 1)))
    names = ("dx", "dbias")
    for name, *tensors, scale in zip(names, grads, ref_grads, base_grads, scales, strict=True):
        assert_policy(*tensors, name, scale=scale)


@pytest.mark.parametrize("be", ["torch", "triton"])
def test_dropout_reproducible_by_seed(be):
    x = torch.randn(8, 64)
    with fastlm.use_backend(be):
        a, b = (ops.bias_act(x, None, "relu", dropout_p=0.5, seed=1) for _ in range(2))
        c = ops.bias_act(x, None, "relu", dropout_p=0.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_compiles_fullgraph_with_the_custom_op():
    x, bias = torch.randn(4, 32), torch.randn(32)
    fn = torch.compile(
        lambda x, b: ops.bias_act(x, b, "silu") * 2, fullgraph=True, backend="aot_eager"
    )
    with fastlm.use_backend("triton"):
        torch.testing.assert_close(fn(x, bias), ops.bias_act(x, bias, "silu") * 2)


def test_opcheck():
    x, bias = torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.bias_act.default, (x, bias, "gelu", 0.0, 0))


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(activation="swish"), ValueError, "activation"),
        (dict(bias=torch.randn(7)), ValueError, "bias"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(bias=torch.ones(8, dtype=torch.int64)), TypeError, "bias"),
    ],
)
def test_bad_input(kwargs, error, word):
    with pytest.raises(error, match=word):
        ops.bias_act(torch.randn(2, 8), **kwargs)
