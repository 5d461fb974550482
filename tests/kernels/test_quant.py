"""Quantized matmul kernels against dequantize-then-matmul in float64."""

from __future__ import annotations

import pytest
import torch
from fastlm.kernels import quant as kernels

from fastlm.ops.quant import quant_matmul_ref, quantize_rows_ref
from fastlm.quant import NF4_CODE, QuantizedWeight, dequantize_weight, quantize_weight
from fastlm.testing import assert_policy, assert_within, poisoned_outputs

DTYPES = [torch.float16, torch.bfloat16]
FORMATS = {
    "int8": dict(bits=8, group_size=None),
    "int4-g32": dict(bits=4, group_size=32),
    "int4-sym-g64": dict(bits=4, group_size=64, symmetric=True),
    "int4-g128": dict(bits=4, group_size=128),
    "nf4-g64": dict(bits=4, group_size=64, scheme="nf4"),
    "nf4-g32-dq": dict(bits=4, group_size=32, scheme="nf4", double_quant=True),
}
# M: decode rows (1), the split-K path's last row count (16), the tiled path (17, 40).
ROWS = [1, 5, 16, 17, 40]


def _skip_unless_triton(backend):
    if backend != "triton":
        pytest.skip("covered by the CUDA GEMV's own tests (tests/kernels/test_quant_gemv_cuda)")


def _k_values(fmt):
    # 4-bit: exactly one group, several, and for groups of 32 an even count (two per
    # 64-wide tile) and an odd one; int8: odd K (no groups).
    g = FORMATS[fmt]["group_size"]
    return [37, 129] if g is None else [g, 2 * g, 3 * g]


def _run(x, qw: QuantizedWeight, bias):
    code = torch.tensor(NF4_CODE, device=x.device) if qw.scheme == "nf4" else None
    return kernels.quant_matmul_fwd(
        x,
        qw.qweight,
        qw.scales,
        qw.zeros,
        qw.scales2,
        qw.scales_mean,
        code,
        bias,
        qw.bits,
        qw.scheme == "nf4",
        qw.group_size if qw.bits == 4 else 0,
        qw.shape[0],
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", ROWS)
def test_quant_matmul_matches_reference(device_backend, fmt, dtype, m):
    """Every (K, N, bias) case of a format, dtype and M, judged together: the policy's max
    error over one output element (N = 1, M = 1) would compare single rounding draws."""
    device, backend = device_backend
    _skip_unless_triton(backend)
    got, refs, bases = [], [], []
    for k in _k_values(fmt):
        for n, with_bias in ((1, True), (45, False), (67, True)):
            w = torch.randn(n, k, device=device) / k**0.5
            qw = quantize_weight(w, **FORMATS[fmt])
            x = torch.randn(m, k, dtype=dtype, device=device)
            bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
            with poisoned_outputs():
                y = _run(x, qw, bias)
            assert y.dtype == dtype and y.shape == (m, n)
            got.append(y.flatten())
            refs.append(
                quant_matmul_ref(x.double(), qw, None if bias is None else bias.double()).flatten()
            )
            bases.append(quant_matmul_ref(x, qw, bias).flatten())
    assert_policy(torch.cat(got), torch.cat(refs), torch.cat(bases), f"{fmt} m={m}")


def test_strided_rows(device_backend):
    """x may be a row-strided view (a slice of a wider activation)."""
    device, backend = device_backend
    _skip_unless_triton(backend)
    qw = quantize_weight(torch.randn(40, 128, device=device) / 11, bits=4, group_size=64)
    wide = torch.randn(20, 256, dtype=torch.bfloat16, device=device)
    x = wide[:, 64:192]
    y = _run(x, qw, None)
    assert_policy(y, quant_matmul_ref(x.double(), qw), quant_matmul_ref(x, qw), "strided")


@pytest.mark.parametrize("m", [1, 19])
def test_quantize_rows_matches_reference(device_backend, m):
    device, backend = device_backend
    _skip_unless_triton(backend)
    x = torch.randn(m, 1500, device=device) * torch.rand(m, 1, device=device) * 10
    xq, xs = kernels.quantize_rows(x)
    ref_q, ref_s = quantize_rows_ref(x)
    # One float32 division each: the reference's is correctly rounded (half an ulp from
    # exact), the kernel's too on the CPU and within 2 ulps on CUDA (div.full.f32).
    eps = torch.finfo(torch.float32).eps
    assert_within(
        xs.double() / ref_s.double(),
        torch.ones_like(xs, dtype=torch.float64),
        2.5 * eps,
        "scales / reference",
        "2.5 float32 ulps, relative",
    )
    # Division rounding may move an element sitting on a .5 tie by one code, no more.
    assert (xq.int() - ref_q.int()).abs().max() <= 1
    assert (xq.int() - ref_q.int()).ne(0).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("k", [16, 97])
def test_w8a8_matches_reference(device_backend, dtype, m, k):
    """int8 x int8 with int32 accumulation is exact: the result is the float64 product of
    the same codes and scales, off by the final rounding to x's dtype (the baseline: that
    exact value rounded once)."""
    device, backend = device_backend
    _skip_unless_triton(backend)
    n = 45
    qw = quantize_weight(torch.randn(n, k, device=device), bits=8, group_size=None)
    x = torch.randn(m, k, device=device)
    xq, xs = quantize_rows_ref(x)
    bias = torch.randn(n, dtype=dtype, device=device)
    with poisoned_outputs():
        y = kernels.w8a8_matmul_fwd(xq, xs, qw.qweight, qw.scales, bias, dtype)
    exact = (xq.double() @ qw.qweight.double().T) * xs.double()[:, None] * qw.scales.double()
    exact = exact + bias.double()
    assert y.dtype == dtype
    assert_policy(y, exact, exact.to(dtype), "w8a8")


def test_dequantize_is_never_materialized_by_the_kernel(device_backend, monkeypatch):
    """The kernel path reads the codes: it must not call the float dequantization."""
    device, backend = device_backend
    _skip_unless_triton(backend)
    import fastlm.ops.quant_formats as formats

    def forbidden(*args, **kwargs):
        raise AssertionError("dequantize_weight called")

    monkeypatch.setattr(formats, "dequantize_weight", forbidden)
    qw = quantize_weight(torch.randn(8, 64, device=device), bits=4, group_size=32)
    y = _run(torch.randn(2, 64, dtype=torch.bfloat16, device=device), qw, None)
    assert y.shape == (2, 8) and torch.isfinite(y).all()
    assert dequantize_weight is not forbidden
