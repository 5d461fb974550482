"""quant_matmul / w8a8_matmul: backends, shapes, autograd, autocast, compile, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.backend import BackendUnavailable
from fastlm.quant import dequantize_weight, quantize_weight
from fastlm.testing import assert_policy

FORMATS = [dict(bits=8), dict(bits=4, group_size=64), dict(bits=4, scheme="nf4")]
IDS = ["int8", "int4-g64", "nf4"]


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_any_leading_dims_and_backends_agree(fmt, backend):
    qw = quantize_weight(torch.randn(24, 128) / 11, **fmt)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    bias = torch.randn(24, dtype=torch.bfloat16)
    with fastlm.use_backend(backend):
        y = ops.quant_matmul(x, qw, bias)
    ref = F.linear(x.double(), dequantize_weight(qw, torch.float64), bias.double())
    base = F.linear(x, dequantize_weight(qw, torch.bfloat16), bias)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16
    assert_policy(y, ref, base, "quant_matmul")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_reach_x_and_bias(backend):
    qw = quantize_weight(torch.randn(24, 64) / 8, bits=4, group_size=32)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(24, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(5, 24, dtype=torch.bfloat16)
    with fastlm.use_backend(backend):
        ops.quant_matmul(x, qw, bias).backward(dy)
    w = dequantize_weight(qw, torch.float64)
    assert_policy(x.grad, dy.double() @ w, dy @ w.to(torch.bfloat16), "dx")
    assert_policy(bias.grad, dy.double().sum(0), dy.sum(0), "dbias")


def test_fp32_on_cpu_runs_the_torch_path_and_autocast_casts():
    qw = quantize_weight(torch.randn(16, 64), bits=8)
    x = torch.randn(3, 64)
    torch.testing.assert_close(ops.quant_matmul(x, qw), x @ dequantize_weight(qw).T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.quant_matmul(x, qw).dtype == torch.bfloat16
    with fastlm.use_backend("triton"), pytest.raises(BackendUnavailable, match="fp16/bf16"):
        ops.quant_matmul(x, qw)


def test_compiles_fullgraph():
    qw = quantize_weight(torch.randn(16, 64), bits=4, group_size=32)
    x = torch.randn(3, 64)
    fn = torch.compile(lambda t: ops.quant_matmul(t, qw), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), ops.quant_matmul(x, qw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_w8a8_matches_its_definition(backend):
    qw = quantize_weight(torch.randn(24, 96), bits=8)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    with fastlm.use_backend(backend):
        y = ops.w8a8_matmul(x, qw)
    xs = x.double().abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x.double() / xs)
    exact = (xq @ qw.qweight.double().T) * xs * qw.scales.double()
    assert_policy(y, exact, exact.to(torch.bfloat16), "w8a8")
    # And it is close to the float product: per-token int8 activations lose ~1 %.
    ref = x.double() @ dequantize_weight(qw, torch.float64).T
    assert ((y.double() - ref).norm() / ref.norm()) < 0.02


def test_errors():
    qw = quantize_weight(torch.randn(16, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\)"):
        ops.quant_matmul(torch.randn(3, 32), qw)
    with pytest.raises(TypeError, match="qw must be a fastlm.quant.QuantizedWeight"):
        ops.quant_matmul(torch.randn(3, 64), torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"bias must be \(16,\)"):
        ops.quant_matmul(torch.randn(3, 64), qw, torch.randn(15))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ops.quant_matmul(torch.ones(3, 64, dtype=torch.int32), qw)
    with pytest.raises(ValueError, match="needs an 8-bit weight"):
        ops.w8a8_matmul(torch.randn(3, 64), qw)


@pytest.mark.parametrize("fmt", [*FORMATS, dict(bits=4, scheme="nf4", double_quant=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_is_dequantize_then_linear_bit_for_bit(fmt, dtype):
    qw = quantize_weight(torch.randn(24, 128) / 11, **fmt)
    stored = {name: t.clone() for name, t in qw.tensors().items()}
    x = torch.randn(2, 3, 128, dtype=dtype)
    for bias in (None, torch.randn(24, dtype=dtype), torch.randn(24)):  # fp32: QuantLinear's
        with fastlm.use_backend("torch"):
            got = ops.quant_matmul(x, qw, bias)
        w = dequantize_weight(qw, dtype)
        # F.linear takes a bias of x's dtype; another is added after, in the wider dtype.
        if bias is None or bias.dtype == dtype:
            want = F.linear(x, w, bias)
        else:
            want = (F.linear(x, w) + bias).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
    # Dequantizing in place never reaches the stored tensors.
    assert all(torch.equal(stored[name], t) for name, t in qw.tensors().items())


def test_eager_entrance_equals_the_compiled_custom_op():
    qw = quantize_weight(torch.randn(16, 64), bits=4, group_size=32)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(16, dtype=torch.bfloat16, requires_grad=True)
    fn = torch.compile(lambda t, b: ops.quant_matmul(t, qw, b), fullgraph=True, backend="aot_eager")
    with fastlm.use_backend("triton"):
        eager, got = ops.quant_matmul(x, qw, bias), fn(x, bias)
        dy = torch.randn_like(eager)
        g_eager = torch.autograd.grad(eager, (x, bias), dy)
        g_got = torch.autograd.grad(got, (x, bias), dy)
    assert torch.equal(got, eager)
    assert all(torch.equal(a, b) for a, b in zip(g_got, g_eager, strict=True))
