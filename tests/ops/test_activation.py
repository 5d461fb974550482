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


_PLAIN = {
    "identity": lambda t: t,
    "relu": torch.nn.functional.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "silu": torch.nn.functional.silu,
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, None)],
    ids=str,
)
def test_torch_path_is_the_plain_expression_bit_for_bit(activation, dtypes, grad):
    # act(x + bias) in place on the fresh sum unless autograd records it: the plain
    # expression's bits either way (a wider bias computes at its precision, returns x's
    # dtype), and x and bias are left untouched.
    x_dtype, b_dtype = dtypes
    x = torch.randn(3, 7, 40, dtype=x_dtype).requires_grad_(grad)
    bias = None if b_dtype is None else torch.randn(40, dtype=b_dtype).requires_grad_(grad)
    leaves = [t for t in (x, bias) if t is not None]
    before = [(t.detach().clone(), t._version) for t in leaves]
    got = ops.bias_act(x, bias, activation)
    want = _PLAIN[activation](x if bias is None else x + bias).to(x_dtype)
    assert got.dtype == x_dtype and torch.equal(got, want)
    if grad:
        dy = torch.randn_like(want)
        for a, b in zip(
            torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
        ):
            assert torch.equal(a, b)
    for t, (value, version) in zip(leaves, before, strict=True):
        assert t._version == version and torch.equal(t.detach(), value)


def test_eager_entrance_equals_the_compiled_custom_op_with_grads():
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda x, b: ops.bias_act(x, b, "gelu"), fullgraph=True, backend="aot_eager")
    with fastlm.use_backend("triton"):
        eager = ops.bias_act(x, bias, "gelu")
        got = fn(x, bias)
        dy = torch.randn_like(eager)
        g_eager = torch.autograd.grad(eager, (x, bias), dy)
        g_got = torch.autograd.grad(got, (x, bias), dy)
    assert torch.equal(got, eager)
    assert all(torch.equal(a, b) for a, b in zip(g_got, g_eager, strict=True))


def test_a_known_signature_still_checks_dropout_and_a_failure_is_never_kept():
    """bias_act's metadata checks are memoized per signature: dropout is still checked on a
    known one, a failing signature raises every time, and the memo stays bounded."""
    from fastlm.ops import _common

    x, bias = torch.randn(3, 8), torch.randn(8)
    ops.bias_act(x, bias, "gelu")  # this signature passes (and is remembered)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.bias_act(x, bias, "gelu", dropout_p=-0.5)
    for _ in range(2):  # never remembered as a pass
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.bias_act(x, bias[:4], "gelu")
        with pytest.raises(ValueError, match="activation"):
            ops.bias_act(x, bias, "gelu ")
        with pytest.raises(TypeError, match="bias"):
            ops.bias_act(x, bias.int(), "gelu")
    passed: dict[tuple, object] = {}
    for i in range(_common.SIGNATURES_KEPT + 5):
        _common.remember(passed, (i,))
    assert 0 < len(passed) <= _common.SIGNATURES_KEPT, len(passed)
    assert (_common.SIGNATURES_KEPT + 4,) in passed
