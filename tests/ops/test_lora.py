"""lora_linear: the fused base + low-rank kernel (float and quantized bases) against the
unfused formula in float64, forward and every gradient, and its dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.activation import seeded_dropout
from fastlm.ops.lora import lora_linear, lora_linear_ref
from fastlm.quant import quantize_weight
from fastlm.testing import assert_policy

BASES = {
    "float": None,
    "int4-g64": dict(bits=4, group_size=64),
    "nf4": dict(bits=4, scheme="nf4"),
    "int8": dict(bits=8),
}


def operands(base, m, dtype, r=8, k=128, n=53):
    w = torch.randn(n, k) / k**0.5
    weight = w.to(dtype) if BASES[base] is None else quantize_weight(w, **BASES[base])
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, dtype=dtype) / r**0.5).requires_grad_()
    return x, weight, torch.randn(n, dtype=dtype), a, b


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, r", [(1, 8), (16, 3), (37, 20)])
def test_fused_matches_the_formula(base, dtype, m, r):
    """m <= 16 takes the quantized kernel's split-K path (update added after the sum), m =
    37 the tiled one (update in the epilogue); r = 3 and 20 pad to 16 and 32."""
    x, weight, bias, a, b = operands(base, m, dtype, r)
    with fastlm.use_backend("triton"):
        y = lora_linear(x, weight, bias, a, b, 2.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref = lora_linear_ref(
        leaves[0],
        weight if BASES[base] else weight.double(),
        bias.double(),
        leaves[1],
        leaves[2],
        2.0,
    )
    ref.backward(dy.double())
    plain = [t.detach().requires_grad_() for t in (x, a, b)]
    baseline = lora_linear_ref(plain[0], weight, bias, plain[1], plain[2], 2.0)
    baseline.backward(dy)
    assert_policy(y, ref, baseline, "y")
    grads = zip(
        ("dx", "dA", "dB"),
        (x.grad, a.grad, b.grad),
        (t.grad for t in leaves),
        (t.grad for t in plain),
        strict=True,
    )
    for name, got, want, pytorch in grads:
        assert_policy(got, want, pytorch, name)


def test_dropout_mask_is_shared_by_forward_and_backward():
    x, weight, bias, a, b = operands("float", 9, torch.bfloat16)
    with fastlm.use_backend("triton"):
        y = lora_linear(x, weight, bias, a, b, 1.0, dropout_p=0.5, seed=3)
    with fastlm.use_backend("torch"):
        y_torch = lora_linear(x, weight, bias, a, b, 1.0, dropout_p=0.5, seed=3)
    (dx,) = torch.autograd.grad(y.sum(), x)
    (dx_torch,) = torch.autograd.grad(y_torch.sum(), x)
    # Both backends draw seed 3's mask from torch's generator: the float64 reference applies
    # that mask explicitly, and the torch backend is PyTorch's own result in bf16.
    keep = seeded_dropout(torch.ones_like(x), 0.5, 3) != 0
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double(), b.detach().double()
    dropped = x64 * keep / (1 - 0.5)
    ref = F.linear(x64, weight.double(), bias.double()) + F.linear(F.linear(dropped, a64), b64)
    (dx_ref,) = torch.autograd.grad(ref.sum(), x64)
    assert_policy(y, ref, y_torch, "y")
    assert_policy(dx, dx_ref, dx_torch, "dx")


def test_errors():
    x, weight, bias, a, b = operands("float", 4, torch.bfloat16)
    with pytest.raises(ValueError, match="shapes do not chain"):
        lora_linear(x, weight, bias, a[:, :64], b, 1.0)
    with pytest.raises(ValueError, match="lora_a has rank 8, lora_b 7"):
        lora_linear(x, weight, bias, a, b[:, :7], 1.0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_is_the_plain_formula_bit_for_bit(base, dtype, grad):
    # The scale and the sum run in place on the GEMMs' fresh outputs: the plain formula's
    # bits, forward and backward, with x, the adapters and the base left as they were.
    from fastlm.quant import dequantize_weight

    x, weight, bias, a, b = operands(base, 6, dtype, r=4, k=64, n=24)
    leaves = [x, a, b]
    for t in leaves:
        t.requires_grad_(grad)
    dense = weight if BASES[base] is None else dequantize_weight(weight, dtype)
    before = [(t.detach().clone(), t._version) for t in (*leaves, dense, bias)]
    with fastlm.use_backend("torch"):
        got = lora_linear(x, weight, bias, a, b, 1.75)
    want = F.linear(x, dense, bias) + F.linear(F.linear(x, a), b) * 1.75
    assert torch.equal(got, want)
    if grad:
        dy = torch.randn_like(want)
        for g, w in zip(
            torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy), strict=True
        ):
            assert torch.equal(g, w)
    for t, (value, version) in zip((*leaves, dense, bias), before, strict=True):
        assert t._version == version and torch.equal(t.detach(), value)


# --- the contract's memo and torch.compile ---------------------------------------------------


def test_a_known_signature_still_checks_its_values_and_a_failure_is_never_kept():
    """The metadata checks are memoized per signature (types, shapes, dtypes, devices): a
    call after a passing one of the same signature still checks its scale and dropout, and a
    failing signature raises every time."""
    x, w, bias, a, b = (t.detach() for t in operands("float", 3, torch.float32, r=4, k=16, n=8))
    lora_linear(x, w, bias, a, b, 2.0)  # this signature passes (and is remembered)
    for scale, error in ((float("nan"), ValueError), (True, TypeError)):
        with pytest.raises(error, match="scale"):
            lora_linear(x, w, bias, a, b, scale)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, bias, a, b, 2.0, dropout_p=1.5)
    for _ in range(2):  # never remembered as a pass
        with pytest.raises(TypeError, match="lora_b"):
            lora_linear(x, w, bias, a, b.double(), 2.0)
        with pytest.raises(ValueError, match="shapes do not chain"):
            lora_linear(x, w, bias, a, b[:5], 2.0)
    got = lora_linear(x, w, bias, a, b, 2.0)  # and the good signature still runs
    torch.testing.assert_close(got, lora_linear_ref(x, w, bias, a, b, 2.0), rtol=0, atol=0)


def test_compiles_fullgraph_on_the_torch_path_without_recompiling_for_the_memo():
    """No graph break on the torch path (fullgraph=True), the compiled result is the eager
    one bit for bit, and eager calls that add signatures to the contract's memo do not make
    the compiled function recompile (the memo is not read while Dynamo traces)."""
    x, w, bias, a, b = (t.detach() for t in operands("float", 3, torch.float32, r=4, k=16, n=8))
    fn = torch.compile(lambda *t: lora_linear(*t, 2.0), fullgraph=True, backend="eager")
    got = fn(x, w, bias, a, b)
    torch.testing.assert_close(got, lora_linear(x, w, bias, a, b, 2.0), rtol=0, atol=0)
    lora_linear(x[:2, :8], w[:, :8], bias, a[:, :8], b, 2.0)  # a new signature, eager
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(fn(x, w, bias, a, b), got, rtol=0, atol=0)
